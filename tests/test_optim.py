"""AdamW parameter groups: layer-wise LR decay by each architecture's own layer list, against hand-written
depths."""

import pytest
import torch
import transformers as tf
from omegaconf import OmegaConf

from embtune.losses.info_nce import InfoNCE
from embtune.model.embedder import Embedder
from embtune.model.pooling import Mean
from embtune.training.optim import param_groups

T = OmegaConf.create({"lr": 2e-5, "layerwise_lr_decay": 0.5, "weight_decay": 0.01})
TINY = dict(vocab_size=64)


def _tiny(name: str):
    """A random 2-layer model of architecture ``name``, hidden size 8, from its transformers config."""
    torch.manual_seed(0)
    return {
        "bert": lambda: tf.BertModel(tf.BertConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                                   intermediate_size=16, **TINY)),
        "roberta": lambda: tf.RobertaModel(tf.RobertaConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                                            intermediate_size=16, **TINY)),
        "distilbert": lambda: tf.DistilBertModel(tf.DistilBertConfig(dim=8, n_layers=2, n_heads=2, hidden_dim=16, **TINY)),
        "gpt2": lambda: tf.GPT2Model(tf.GPT2Config(n_embd=8, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                                                   **TINY)),
        "falcon": lambda: tf.FalconModel(tf.FalconConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                                         **TINY)),
        "bloom": lambda: tf.BloomModel(tf.BloomConfig(hidden_size=8, n_layer=2, n_head=2, **TINY)),
        "llama": lambda: tf.LlamaModel(tf.LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                                      num_attention_heads=2, num_key_value_heads=1, **TINY)),
        "qwen2": lambda: tf.Qwen2Model(tf.Qwen2Config(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                                      num_attention_heads=2, num_key_value_heads=1, **TINY)),
        "t5_encoder": lambda: tf.T5EncoderModel(tf.T5Config(d_model=8, d_ff=16, d_kv=4, num_layers=2, num_heads=2,
                                                             **TINY)),
    }[name]()


# Depth by parameter-name prefix, written down from each architecture's module tree: embeddings 0, layer i
# i + 1, what follows the last layer (final norm, pooler) 2. T5's blocks hold sub-layers (block.N.layer.M):
# the depth is N + 1, never M + 1.
DEPTHS = {
    "bert": {"embeddings.": 0, "encoder.layer.0.": 1, "encoder.layer.1.": 2, "pooler.": 2},
    "roberta": {"embeddings.": 0, "encoder.layer.0.": 1, "encoder.layer.1.": 2, "pooler.": 2},
    "distilbert": {"embeddings.": 0, "transformer.layer.0.": 1, "transformer.layer.1.": 2},
    "gpt2": {"wte.": 0, "wpe.": 0, "h.0.": 1, "h.1.": 2, "ln_f.": 2},
    "falcon": {"word_embeddings.": 0, "h.0.": 1, "h.1.": 2, "ln_f.": 2},
    "bloom": {"word_embeddings.": 0, "word_embeddings_layernorm.": 0, "h.0.": 1, "h.1.": 2, "ln_f.": 2},
    "llama": {"embed_tokens.": 0, "layers.0.": 1, "layers.1.": 2, "norm.": 2},
    "qwen2": {"embed_tokens.": 0, "layers.0.": 1, "layers.1.": 2, "norm.": 2},
    "t5_encoder": {"shared.": 0, "encoder.block.0.": 1, "encoder.block.1.": 2, "encoder.final_layer_norm.": 2},
}
LR = {0: 2e-5 * 0.25, 1: 2e-5 * 0.5, 2: 2e-5}  # lr · decay^(L − depth), L = 2, decay 0.5


def _groups_by_name(model, loss_fn, t=T) -> dict[str, tuple[float, float]]:
    groups = param_groups(model, loss_fn, t)
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert len(by_id) == sum(len(g["params"]) for g in groups)  # every parameter in exactly one group
    return {n: by_id[id(p)] for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", DEPTHS)
def test_layerwise_decay_follows_each_architectures_layers(arch):
    got = _groups_by_name(Embedder(_tiny(arch), None, Mean()), InfoNCE(temperature=0.05, learnable=True))
    for name, (lr, wd) in got.items():
        short = name.removeprefix("encoder.")  # the Embedder holds the transformer as .encoder
        depth = [d for prefix, d in DEPTHS[arch].items() if short.startswith(prefix)]
        assert len(depth) == 1, f"{arch}: {short} has no hand-written depth"
        assert lr == pytest.approx(LR[depth[0]], rel=1e-12), short
        assert wd == (0.0 if short.endswith("bias") or "norm" in short.lower() or "ln_" in short else 0.01), short


def test_the_loss_parameters_and_a_second_tower_get_their_own_rates():
    model = Embedder(_tiny("bert"), None, Mean(), document_encoder=_tiny("bert"))
    loss_fn = InfoNCE(temperature=0.05, learnable=True)
    groups = param_groups(model, loss_fn, T)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    doc = dict(model.document_encoder.named_parameters())
    assert lr_of[id(doc["embeddings.word_embeddings.weight"])] == pytest.approx(LR[0])
    assert lr_of[id(doc["encoder.layer.0.output.dense.weight"])] == pytest.approx(LR[1])
    assert lr_of[id(loss_fn.log_inv_temperature)] == pytest.approx(2e-5)  # weight_lr_multiplier 1


def test_lora_adapters_decay_by_the_layer_they_sit_in():
    from peft import LoraConfig, get_peft_model

    encoder = get_peft_model(_tiny("qwen2"), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    got = _groups_by_name(Embedder(encoder, None, Mean()), InfoNCE())
    assert got and all("lora_" in n for n in got)  # only the adapters train
    for name, (lr, _) in got.items():
        assert lr == pytest.approx(LR[1] if ".layers.0." in name else LR[2]), name


def test_decay_on_a_model_without_a_layer_list_is_refused_and_off_it_is_one_rate():
    albert = tf.AlbertModel(tf.AlbertConfig(hidden_size=8, embedding_size=8, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=16, **TINY))
    model = Embedder(albert, None, Mean())  # ALBERT: one layer's weights shared by all num_hidden_layers
    with pytest.raises(ValueError, match="train.layerwise_lr_decay: AlbertModel has no list of num_hidden_layers=2"):
        param_groups(model, InfoNCE(), T)
    off = OmegaConf.merge(T, {"layerwise_lr_decay": 1.0})
    assert {lr for lr, _ in _groups_by_name(model, InfoNCE(), off).values()} == {2e-5}

