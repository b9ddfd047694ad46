"""embtune.training.precision: bf16 only where the hardware multiplies bf16 natively, decided from the
CPU's flags (given here as fake cpuinfo files) or the CUDA device's support."""

import pytest
import torch

from embtune.training import precision as P

# the flags lines of two real processors, shortened: Sapphire Rapids (AMX, AVX512-BF16) and Ice Lake (neither)
SAPPHIRE_RAPIDS = "fpu vme sse sse2 avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8 avx512_vnni"
ICE_LAKE = "fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_vnni avx512_vbmi2"


def _cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
                    f"flags\t\t: {flags}\n")
    return path


def test_cpu_flags_are_read_from_cpuinfo_and_a_missing_file_gives_none(tmp_path):
    flags = P.cpu_flags(_cpuinfo(tmp_path, SAPPHIRE_RAPIDS))
    assert flags == frozenset(SAPPHIRE_RAPIDS.split())
    assert P.cpu_flags(tmp_path / "absent") is None
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")  # aarch64 names no "flags"
    assert P.cpu_flags(tmp_path / "arm") is None


@pytest.mark.parametrize("flags, native", [(SAPPHIRE_RAPIDS, True), (ICE_LAKE, False),
                                           ("avx512f avx512_bf16", True), ("avx2 amx_bf16", True)])
def test_native_bf16_is_read_from_the_cpu_flags_and_auto_follows_it(tmp_path, flags, native):
    f = P.cpu_flags(_cpuinfo(tmp_path, flags))
    assert P.cpu_has_bf16(f) is native
    assert P.use_bf16("auto", "cpu", flags=f) is native  # emulated bf16 would be slower than fp32
    assert P.use_bf16(False, "cpu", flags=f) is False
    if native:
        assert P.use_bf16(True, "cpu", flags=f) is True


def test_true_is_refused_by_name_where_bf16_would_be_emulated():
    ice_lake = frozenset(ICE_LAKE.split())
    with pytest.raises(ValueError, match=r"eval\.bf16=true.*avx512_bf16.*eval\.bf16=auto"):
        P.use_bf16(True, "cpu", option="eval.bf16", flags=ice_lake)
    assert P.use_bf16(True, "cpu", flags=frozenset(SAPPHIRE_RAPIDS.split())) is True


@pytest.mark.parametrize("bad", ["yes", 1, 0, None, "bf16"])
def test_other_values_are_refused_naming_the_option(bad):
    with pytest.raises(ValueError, match=r"train\.bf16 must be auto, true or false"):
        P.use_bf16(bad, "cpu", flags=frozenset())


def test_old_and_command_line_spellings_are_read(tmp_path):
    f = frozenset(SAPPHIRE_RAPIDS.split())
    assert P.use_bf16("True", "cpu", flags=f) is True and P.use_bf16("false", "cpu", flags=f) is False
    assert P.use_bf16(" AUTO ", "cpu", flags=f) is True  # read as auto (bf16 on this CPU), not refused


def test_cuda_follows_the_device_support_and_other_devices_stay_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert P.use_bf16("auto", "cuda", flags=frozenset()) is True  # the CPU's flags do not matter there
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    assert P.use_bf16("auto", "cuda:0") is False
    with pytest.raises(ValueError, match="train.bf16=true"):
        P.use_bf16(True, "cuda")
    assert P.use_bf16("auto", "mps", flags=frozenset(SAPPHIRE_RAPIDS.split())) is False


def test_the_recorded_name():
    assert P.precision_name(True) == "bf16-autocast" and P.precision_name(False) == "fp32"


def test_a_bf16_autocast_training_step_is_the_fp32_step_within_bf16_rounding(tiny_bert):
    """The same batch and dropout masks (same seed: the masks do not depend on the dtype), once in fp32
    and once with ``model.bf16`` (what ``train.bf16=auto`` sets on a bf16 CPU). bf16 rounds each product's
    inputs to 8 significand bits (2^-9 relative); after the tower's few layers the unit-length embeddings'
    cosines move by ~1e-3, the logits cos/τ (τ = 0.05) by 20 times that, and InfoNCE's loss by at most twice
    the largest logit change (its gradient in the logits has row L1 norm <= 2): 0.05 leaves a margin over the
    ~0.02 this gives. Gradients land in fp32 on the fp32 master weights and point the same way."""
    from embtune.data.batching import candidate_batch
    from embtune.data.formats import Example
    from embtune.losses.info_nce import InfoNCE
    from embtune.model import from_pretrained, kernels
    from embtune.model.pooling import Mean
    from embtune.negatives import InBatch
    from embtune.objectives import objective_for

    torch.manual_seed(0)
    model = from_pretrained(tiny_bert, pooling=Mean(), query_max_length=16, document_max_length=24).train()
    words = "protein cell gene yeast repair dna membrane enzyme signal growth".split()
    examples = [Example(f"what does {w} do in {v}", f"{v} {w} studies show {w} acts on {v} tissue")
                for w, v in zip(words, words[3:] + words[:3])]
    batch = candidate_batch(model, examples)
    objective = objective_for(InfoNCE(temperature=0.05), InBatch())
    params = [p for p in model.parameters() if p.requires_grad]
    steps = {}
    with kernels.fast_dropout(model):
        for bf16 in (False, True):
            model.bf16 = bf16
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            loss, _ = objective.loss(model, batch, [(model.dim, 1.0)])
            loss.backward()
            steps[bf16] = loss, torch.cat([p.grad.flatten() for p in params if p.grad is not None])
            assert loss.dtype == torch.float32  # the scores and the loss are fp32 either way
    assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32) for p in params)
    (l32, g32), (l16, g16) = steps[False], steps[True]
    assert abs(l16.item() - l32.item()) < 0.05 and l16.item() != l32.item()  # close, and it did run in bf16
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0).item() > 0.99
