"""The model: an encoder or decoder LLM, a pooling, normalisation; building, saving and loading it.

The public names below are what configs' ``_target_`` paths and users import; they are stored in
checkpoints and model folders, so they are a file format.
"""

from embtune.model.cross_encoder import CrossEncoderTeacher
from embtune.model.embedder import Embedder
from embtune.model.io import builds_multi_vector, from_pretrained, from_pretrained_multi_vector, load, save
from embtune.model.multi_vector import MultiVectorEmbedder
from embtune.model.pooling import CLS, LastToken, Max, Mean, WeightedMean
from embtune.model.resolve import resolve_model_path

__all__ = ["CLS", "CrossEncoderTeacher", "Embedder", "LastToken", "Max", "Mean", "MultiVectorEmbedder", "WeightedMean",
           "builds_multi_vector", "from_pretrained", "from_pretrained_multi_vector", "load", "resolve_model_path",
           "save"]
