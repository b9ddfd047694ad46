"""The sentence-transformers files of a saved model, written so that ``SentenceTransformer(path)`` gives
the vectors embtune gives, and a list of what it cannot be told.

One tower's folder gets ``modules.json`` (Transformer, then Pooling or a token-level Dense, an optional
identity-slice Dense for a Matryoshka truncation, Normalize), ``sentence_bert_config.json`` (the lengths),
``config_sentence_transformers.json`` (prompts, similarity) and a tokenizer that appends the EOS itself
when embtune appended one (so sentence-transformers, which only calls the tokenizer, pools the same token).
Checked against sentence-transformers 6.2 (``base/modules/transformer.py``, ``sentence_transformer/model.py``).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from embtune.model.multi_vector import MultiVectorEmbedder
from embtune.model.stored import ST_FLAGS

log = logging.getLogger(__name__)

DENSE = "1_Dense"  # a multi-vector model's projection, as a sentence-transformers Dense on token embeddings
TRUNCATE = "2_Dense"  # a Matryoshka truncation, as a Dense whose rows are the first d rows of the identity


def write_st_files(model, encoder, tokenizer, folder: Path, query_max_length: int) -> None:
    """Write one tower's sentence-transformers files into ``folder``; ``query_max_length`` is this tower's
    query length (a document tower's files say the document length for both)."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    hidden = encoder.config.hidden_size
    if isinstance(model, MultiVectorEmbedder):  # token vectors: no pooling, no per-text normalisation
        _dense(folder / DENSE, model.projection.weight, "token_embeddings")
        modules.append({"idx": 1, "name": "1", "path": DENSE, "type": "sentence_transformers.models.Dense"})
    else:
        flags = {flag: False for flag in ST_FLAGS.values()} | {"pooling_mode_mean_sqrt_len_tokens": False}
        flags[ST_FLAGS[model.pooling.st_mode]] = True
        (folder / "1_Pooling").mkdir()
        write_json(folder / "1_Pooling" / "config.json", {
            "word_embedding_dimension": hidden, **flags,
            "include_prompt": not getattr(model.pooling, "exclude_prompt", False)})
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
        if model.truncate_dim and model.truncate_dim < hidden:  # truncate, then normalise (Matryoshka)
            _dense(folder / TRUNCATE, torch.eye(hidden)[:model.truncate_dim], "sentence_embedding")
            modules.append({"idx": 2, "name": "2", "path": TRUNCATE, "type": "sentence_transformers.models.Dense"})
        if model.normalize:
            idx = len(modules)
            (folder / f"{idx}_Normalize").mkdir()
            modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
    write_json(folder / "modules.json", modules)
    lengths = {"max_seq_length": model.document_max_length, "do_lower_case": False}
    if query_max_length != model.document_max_length:  # read by sentence-transformers >= 6 (encode_query)
        lengths |= {"query_length": query_max_length, "document_length": model.document_max_length}
    write_json(folder / "sentence_bert_config.json", lengths)
    # encode_document reads "document" first (sentence-transformers 6 adds an empty one when a folder has none, so
    # an e5 folder's "passage" alone would be skipped); the starting model's own name is kept beside it
    prompts = {**model.named_prompts, "query": model.query_prompt, "document": model.document_prompt,
               model.document_prompt_name: model.document_prompt}
    similarity = "cosine" if model.normalize or isinstance(model, MultiVectorEmbedder) else "dot"
    write_json(folder / "config_sentence_transformers.json", {
        "prompts": prompts, "default_prompt_name": model.default_prompt_name, "similarity_fn_name": similarity})
    (eos_tokenizer(tokenizer) if model.append_eos else tokenizer).save_pretrained(folder)


def eos_tokenizer(tokenizer):
    """A copy of ``tokenizer`` that ends every text in EOS itself, within ``max_length`` (truncation keeps
    room for it), as :func:`embtune.model.llm.append_eos` does; a tokenizer that does so already is returned
    as it is. Uses the ``add_eos_token`` switch where the tokenizer has one (it is saved in
    ``tokenizer_config.json`` and rebuilds the post-processor on load), keeping what it adds in front (BOS).

    Raises:
        ValueError: a tokenizer that can be told neither way (then sentence-transformers would pool
            another token than embtune; never saved silently).
    """
    def ends_in_eos(tok) -> bool:
        ids = tok("a")["input_ids"]
        return bool(ids) and ids[-1] == tok.eos_token_id

    if ends_in_eos(tokenizer):
        return tokenizer
    tok = copy.deepcopy(tokenizer)
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    prefix = full[:len(full) - len(plain)] if full[len(full) - len(plain):] == plain else None
    if prefix in ([], [tok.bos_token_id]) and hasattr(tok, "add_eos_token"):
        try:
            tok.add_bos_token = prefix == [tok.bos_token_id]  # the setters rebuild the post-processor
            tok.add_eos_token = True
        except AttributeError:  # older transformers: read-only flags on some classes
            pass
    if not ends_in_eos(tok) or tok("a")["input_ids"][:-1] != full:
        raise ValueError(f"cannot make the tokenizer ({type(tokenizer).__name__}) append EOS itself, so "
                         "sentence-transformers would pool another token than embtune did; save with "
                         "model.append_eos=false or a tokenizer with add_eos_token")
    return tok


def st_differences(model) -> list[str]:
    """What ``SentenceTransformer(path)`` will do differently from ``embtune.load(path)`` for ``model``."""
    notes = []
    if isinstance(model, MultiVectorEmbedder):
        notes.append("multi-vector: SentenceTransformer gives the projected token vectors without per-token "
                     "normalisation (encode(output_value='token_embeddings')) and no MaxSim scoring")
    if model.query_max_length != model.document_max_length:
        notes.append(f"queries at {model.query_max_length} tokens only through encode_query in "
                     f"sentence-transformers >= 6 (sentence_bert_config.json query_length); encode(prompt_name=...) "
                     f"and servers that read only max_seq_length cut queries at {model.document_max_length}, and "
                     f"older sentence-transformers versions do not know query_length (they may refuse the key)")
    if model.document_encoder is not None:
        notes.append("two towers: SentenceTransformer(path) loads the query tower only (document/ holds the "
                     "document tower as a model of its own)")
    return notes


def _dense(folder: Path, weight: torch.Tensor, io_name: str) -> None:
    folder.mkdir()
    save_file({"linear.weight": weight.detach().float().cpu().contiguous()}, str(folder / "model.safetensors"))
    write_json(folder / "config.json", {
        "in_features": weight.shape[1], "out_features": weight.shape[0], "bias": False,
        "activation_function": "torch.nn.modules.linear.Identity",
        "module_input_name": io_name, "module_output_name": io_name})


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")

