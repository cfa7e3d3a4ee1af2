"""Multi-file models in the forms real published files take, beyond the T5/BART fixtures: further seq2seq families
(MarianMT, mBART, Pegasus, M2M100: sinusoidal positions, final_logits_bias, scaled embeddings, pre-LN), quantized
files under the names quantizers write (optimum's ORTQuantizer and transformers.js: `*_quantized.onnx`, merged
decoders quantized inside their If branches), and a 4-bit MatMulNBits T5. Greedy generation through the bundle
equals the original files' (the quantized originals, never the fp32 ones) and verify passes on every call."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import onnx
import pytest

from stip.compiler.multifile import compile_files
from stip.passes.errors import StipError
from stip.passes.multifile import discover
from stip.runtime.bundle_format import Layout, Manifest
from stip.runtime.generate import Sampler
from stip.runtime.multifile import MultiGenerator, generate_original, verify_files

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import export_multifile  # noqa: E402
from export_optimum import ExportError  # noqa: E402

pytestmark = pytest.mark.optimum
PROMPT = [5, 17, 42, 8, 99, 3]


def _export(module, case: str) -> Path:
    try:
        return module.cached_export(case)
    except ExportError as e:
        pytest.fail(f"optimum export of {case} failed: {e}", pytrace=False)


def _same_generation_and_verify(src: Path | list[Path], out: Path, tol: float = 1e-4) -> list[int]:
    """Greedy tokens through the bundle equal the original files'; verify passes on every decoder call."""
    files = discover(src if isinstance(src, list) else [src])
    gen = MultiGenerator(out, device="cpu")
    gen.eos_id = None  # a random model may emit eos at once; compare a fixed number of tokens
    got = list(gen.generate(PROMPT, 8, Sampler()))
    links = Manifest.read(Layout(out).manifest)["links"]
    assert got == generate_original(files, links, gen.kind, PROMPT, 8, Sampler(), gen.start_id, None)
    checks = verify_files(out, files, batch=2, seq=6, steps=3, device="cpu")
    assert all(c.ok for c in checks) and max(c.max_abs for c in checks) < tol, [(c.name, c.max_abs) for c in checks]
    return got


@pytest.mark.parametrize("case", export_multifile.FAMILIES)
def test_seq2seq_families_generate_as_the_original_files(tmp_path, case):
    src = _export(export_multifile, case)
    report = compile_files([src], tmp_path / "b")  # the directory: encoder + merged decoder (both roles)
    assert set(report["files"]) == {"encoder", "decoder", "decoder_with_past"}
    _same_generation_and_verify(src, tmp_path / "b")


def _quantize_dir(src: Path, dst: Path, names: tuple[str, ...], per_channel: bool, suffix: str) -> Path:
    """onnxruntime's dynamic int8 on each file (inside the merged decoder's If branches too), saved under the
    name optimum's ORTQuantizer gives it (`encoder_model_quantized.onnx`), beside the export's config.json."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.mkdir(parents=True)
    for f in src.glob("*.json"):
        shutil.copy(f, dst / f.name)
    for name in names:
        quantize_dynamic(str(src / name), str(dst / name.replace(".onnx", f"{suffix}.onnx")), per_channel=per_channel,
                         weight_type=QuantType.QInt8, extra_options={"EnableSubgraph": True})
    return dst


def _count(path: Path, op: str) -> int:
    def walk(g):
        for n in g.node:
            yield n
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    yield from walk(a.g)

    return sum(n.op_type == op for n in walk(onnx.load(str(path)).graph))


@pytest.mark.parametrize("case,per_channel", [("t5", True), ("bart", False)])
def test_dynamic_int8_merged_seq2seq_under_quantizer_names(tmp_path, case, per_channel):
    src = _export(export_multifile, case)
    q = _quantize_dir(src, tmp_path / "q", ("encoder_model.onnx", "decoder_model_merged.onnx"), per_channel,
                      "_quantized")
    assert _count(q / "decoder_model_merged_quantized.onnx", "MatMulInteger") >= 20  # both branches quantized
    compile_files([q], tmp_path / "b")
    _same_generation_and_verify(q, tmp_path / "b", tol=1e-2)


def test_dynamic_int8_decoder_pair(tmp_path):
    src = _export(export_multifile, "bart")
    names = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")
    q = _quantize_dir(src, tmp_path / "q", names, True, "_int8")
    compile_files([q / n.replace(".onnx", "_int8.onnx") for n in names], tmp_path / "b")
    _same_generation_and_verify([q / n.replace(".onnx", "_int8.onnx") for n in names], tmp_path / "b", tol=1e-2)


def test_several_variants_in_one_directory_are_refused_naming_one(tmp_path):
    """transformers.js ships every variant side by side: which one to compile is the user's choice."""
    src = _export(export_multifile, "t5")
    d = tmp_path / "onnx"
    d.mkdir()
    for name in ("encoder_model.onnx", "decoder_model_merged.onnx"):
        shutil.copy(src / name, d / name)
        shutil.copy(src / name, d / name.replace(".onnx", "_quantized.onnx"))
    with pytest.raises(StipError, match=r"2 variants of one model \(suffixes \(none\), _quantized\); pass the files "
                                        r"of one variant: .*decoder_model_merged_quantized.onnx .*encoder_model_"):
        discover([d])
    assert discover([d / "encoder_model_quantized.onnx", d / "decoder_model_merged_quantized.onnx"])["decoder"].name \
        == "decoder_model_merged_quantized.onnx"
    two = tmp_path / "two"  # optimum-cli onnxruntime quantize -o beside the export: two one-file models
    two.mkdir()
    for name in ("model.onnx", "model_quantized.onnx"):
        shutil.copy(src / "encoder_model.onnx", two / name)
    with pytest.raises(StipError, match=r"model_quantized.onnx: 2 separate models .*pass one file to compile it"):
        discover([two])


def test_matmul_nbits_t5(tmp_path):
    """4-bit blocks of 16 on a T5 whose heads are 8 wide: blocks hold two heads, so the head permutation moves
    pairs of heads; T5's zero position bias (ConstantOfShape) must not pin the heads."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    src = _export(export_multifile, "t5")
    q = tmp_path / "q"
    q.mkdir()
    for f in src.glob("*.json"):
        shutil.copy(f, q / f.name)
    for name in ("encoder_model.onnx", "decoder_model_merged.onnx"):
        quantizer = MatMulNBitsQuantizer(onnx.load(str(src / name)),
                                         algo_config=DefaultWeightOnlyQuantConfig(block_size=16, is_symmetric=True))
        quantizer.process()
        onnx.save(quantizer.model.model, str(q / name))
    assert _count(q / "decoder_model_merged.onnx", "MatMulNBits") >= 20
    compile_files([q], tmp_path / "b")
    _same_generation_and_verify(q, tmp_path / "b", tol=1e-4)


def test_dynamic_int8_merged_llama_through_the_cli(tmp_path):
    """A quantized merged decoder alone (transformers.js' decoder_model_merged_quantized.onnx): compile, generate
    and verify from the command line. Its activations are quantized inside the If branches, which the tolerance
    must see (as it sees a one-file model's)."""
    import subprocess

    legacy = pytest.importorskip("export_optimum_legacy")
    src = _export(legacy, "llama")
    q = _quantize_dir(src, tmp_path / "q", ("decoder_model_merged.onnx",), True, "_quantized")
    stip = [sys.executable, "-m", "stip.compiler.cli"]
    r = subprocess.run([*stip, "compile", str(q), "-o", str(tmp_path / "b"), "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*stip, "verify", str(tmp_path / "b"), "--original", str(q)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS: original files vs the bundle: prefill 13 tokens" in r.stdout and "atol=0.01," in r.stdout, r.stdout
    files = discover([q])
    gen = MultiGenerator(tmp_path / "b", device="cpu")
    gen.eos_id = None
    links = Manifest.read(Layout(tmp_path / "b").manifest)["links"]
    assert list(gen.generate(PROMPT, 8, Sampler())) == \
        generate_original(files, links, gen.kind, PROMPT, 8, Sampler(), None, None)
