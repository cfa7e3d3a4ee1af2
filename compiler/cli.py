"""The `stip` command line. Each subcommand's help text is its docstring, as in Polygraphy."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from stip.runtime.errors import StipError


def _progress(quiet: bool):
    """A rich progress bar per compile step, on stderr; silent with --quiet."""
    if quiet:
        return None, contextlib.nullcontext()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True))

    def step(label: str, total: int | None):
        task = prog.add_task(label, total=total or 1)

        def tick() -> None:
            prog.advance(task, 1)

        return tick

    return step, prog


def cmd_compile(a: argparse.Namespace) -> int:
    """Compile an exported ONNX Transformer into a STIP bundle: server/, client/ and developer/ (the key)."""
    from stip.compiler.external import parse_size
    from stip.compiler.multifile import is_multifile, single_file
    from stip.compiler.pipeline import compile_model

    if is_multifile(a.model):
        return _compile_files(a)
    a.model = str(single_file(a.model) or a.model[0])  # a directory holding one model.onnx: that file
    step, ctx = _progress(a.quiet)
    with ctx:
        report = compile_model(a.model, a.output, force=a.force, private=a.private, public=a.public,
                               external_data=a.external_data, progress=step, head=a.head,
                               tokenizer=a.tokenizer, max_context=a.max_context, check=a.check,
                               shard_size=parse_size(a.shard_size, "--shard-size") if a.shard_size else None)
    for w in report.get("warnings", []) + report.get("unpermuted_crossings", []):
        print(f"stip compile: warning: {w}", file=sys.stderr)
    sizes = report["bundle_sizes"]
    print(f"wrote {a.output}  key id {report['key_id']}  {len(report['spaces'])} spaces, "
          f"{report['layers']} attention layers, {report['permuted_weights']} permuted weights")
    chk = report["self_check"]
    checked = None
    if isinstance(chk, dict):
        worst = max(chk["outputs"], key=lambda r: r["max_abs"] / max(r["tolerance"], 1e-30))
        checked = (f"pre -> server -> post matches the original on {len(chk['outputs'])} outputs (batch "
                   f"{chk['batch']}, {chk['seq']} tokens; largest diff {worst['max_abs']:.2g} on '{worst['output']}')")
    _print_bundle(a.output, sizes, "pre.onnx + post.onnx, for users", checked, a.model)
    return 0


def _print_bundle(out: str, sizes: dict, client: str, checked: str | None, original: str) -> None:
    """The lines after `wrote ...` that one-file and multi-file compiles share: who gets what, the check, next."""
    print(f"  server/                {sizes['server_bytes'] / 2**20:8.1f} MiB  permuted weights, no key")
    print(f"  client/                {sizes['client_bytes'] / 2**20:8.1f} MiB  {client}")
    print("  developer/key.npz                    the key (mode 0600): never ship it")
    print(f"checked: {checked}" if checked else
          "not checked (--no-check): run `stip verify` before shipping the bundle")
    print(f"next: stip verify {out} --original {original}")


def cmd_inspect(a: argparse.Namespace) -> int:
    """Show what the compiler sees in a model (layers, spaces, boundary, warnings) and every blocker compile would
    refuse it with (exit 0: it is a report; JSON "compiles" and "blockers"), or what a bundle holds."""
    from stip.compiler.inspect import inspect_bundle, inspect_model
    from stip.compiler.report import render
    from stip.runtime.bundle_format import Layout

    p = Path(a.target)
    if p.is_dir() and not Layout(p).manifest.exists():  # an export directory (optimum's), not a bundle
        from stip.compiler.multifile import single_file

        one = single_file([p])
        if one is None:  # several files: what the compiler sees in each, linked as `stip compile DIR` links them
            from stip.compiler.inspect import inspect_files

            reports = inspect_files([p], a.private, a.public)
            if a.json:
                print(json.dumps(reports, indent=2))
                return 0
            for role, report in reports["files"].items():
                print(f"== {role}: {report.get('model', '')}\n{render(report)}")
            print("server-held tensors between files: " + (", ".join(
                f"{src}:{out} -> {dst}:{inp}" for src, out, dst, inp in reports["links"]) or "none"))
            return 0
        p = one
    report = inspect_bundle(p) if p.is_dir() else inspect_model(p, a.private, a.public)
    print(json.dumps(report, indent=2) if a.json else render(report), end="" if not a.json else "\n")
    return 0


def cmd_audit(a: argparse.Namespace) -> int:
    """Measure what the known attacks on permutation schemes recover from a bundle, from the server's view (its
    graph plus sample traffic through the client's pre): weight matching and vocabulary matching against
    --reference weights, and with no reference the linkable token encoding, attention maps, logit order and
    plaintext inputs. developer/key.npz is used only to score the attacks; the result also goes into
    developer/report.json."""
    from stip.compiler.audit import audit
    from stip.compiler.audit.render import render

    if not Path(a.bundle).is_dir():
        raise StipError(f"{a.bundle}: not a directory (expected a bundle written by `stip compile`)")
    step, ctx = _progress(a.quiet or a.json)
    with ctx:
        result = audit(a.bundle, a.reference, samples=a.samples, seq=a.seq, prompts=a.prompt, layers=a.layers,
                       progress=step)
    print(json.dumps(result, indent=2) if a.json else render(result), end="\n" if a.json else "")
    return 0


def _compile_files(a: argparse.Namespace) -> int:
    """Several files of one model (a directory optimum wrote, or the files): one bundle, one key."""
    from stip.compiler.external import parse_size
    from stip.compiler.multifile import compile_files

    for flag, value, default in (("--private", a.private, None), ("--public", a.public, None),
                                 ("--head", a.head, "server"), ("--max-context", a.max_context, None)):
        if value != default and value:
            raise StipError(f"{flag}: not supported when compiling several files ({' '.join(a.model)}); "
                            "compile without it")
    step, ctx = _progress(a.quiet)
    with ctx:
        report = compile_files(a.model, a.output, force=a.force, tokenizer=a.tokenizer, check=a.check,
                               progress=step, external_data=a.external_data,
                               shard_size=parse_size(a.shard_size, "--shard-size") if a.shard_size else None)
    sizes = report["bundle_sizes"]
    print(f"wrote {a.output}  key id {report['key_id']}  {len(report['files'])} files "
          f"({', '.join(report['files'])}), {len(report['links'])} server-held tensors between them")
    chk = report["self_check"]
    checked = None
    if isinstance(chk, dict):
        worst = max(chk["outputs"], key=lambda r: r["max_abs"])
        what = "encode, prefill and decode" if "encoder" in report["files"] else "prefill and decode"
        checked = (f"{what} through the bundle match the original files on {len(chk['outputs'])} decoder calls "
                   f"(largest diff {worst['max_abs']:.2g} on '{worst['output']}')")
    _print_bundle(a.output, sizes, "pre/post per file, for users", checked, " ".join(a.model))
    return 0


def _default_tolerances(a: argparse.Namespace, originals) -> bool:
    """Fills a left-out --atol/--rtol with the precision the originals compute in, as the self-check judges them
    (fp16 and bf16 sum with ~1e-3 and ~1e-2 rounding, not fp32's 1e-7; quantized activations a few steps).
    True when both were left out."""
    if a.atol is not None and a.rtol is not None:
        return False
    from stip.compiler.selfcheck import output_tolerances

    floor = max([1e-4, *(t for f in set(originals) for t in output_tolerances(f).values())])
    a.atol = floor if a.atol is None else a.atol
    a.rtol = floor if a.rtol is None else a.rtol
    return a.atol == a.rtol == floor


def _verify_files(a: argparse.Namespace) -> int:
    from stip.passes.multifile import discover
    from stip.runtime.multifile import verify_files

    files = discover([Path(p) for p in a.original])
    _default_tolerances(a, files.values())
    checks = verify_files(a.bundle, files, batch=a.batch, seq=a.seq,
                          steps=a.past, seed=a.seed, atol=a.atol, rtol=a.rtol, device=a.device)
    ok = all(c.ok for c in checks)
    if a.json:
        print(json.dumps({"passed": ok, "outputs": [c.__dict__ | {"ok": c.ok} for c in checks]}, indent=2))
    else:
        print(f"{'call:output':32} {'shape':16} {'max abs diff':>12} {'argmax agree':>12}  result")
        for c in checks:
            print(f"{c.name:32} {str(c.shape):16} {c.max_abs:12.3e} {c.argmax_agree:12.2%}  "
                  f"{'PASS' if c.ok else 'FAIL'}")
        encode = "encode, " if "encoder" in files else ""
        print(f"{'PASS' if ok else 'FAIL'}: original files vs the bundle: {encode}prefill {a.seq} tokens, then "
              f"{a.past} cached steps (atol={a.atol}, rtol={a.rtol}, batch={a.batch})")
    return 0 if ok else 1


def cmd_verify(a: argparse.Namespace) -> int:
    """Run the original model and pre -> server -> post on the same random inputs; PASS or FAIL (exit 1)."""
    import onnx

    from stip.compiler.selfcheck import QUANTIZED_ACTIVATIONS, quantized_activation
    from stip.runtime.multifile import is_multifile_bundle
    from stip.runtime.verify import verify

    if is_multifile_bundle(a.bundle):
        return _verify_files(a)
    if len(a.original) != 1:
        raise StipError(f"--original: {a.bundle} holds one file; pass the one .onnx it was compiled from")
    a.original = a.original[0]
    if not Path(a.original).exists():
        raise StipError(f"{a.original}: no such file")
    if Path(a.original).is_dir():  # optimum's one-file export directory: its model file
        from stip.compiler.multifile import single_file

        one = single_file([a.original])
        if one is None:
            raise StipError(f"--original {a.original}: a directory, and {a.bundle} holds one file; pass the .onnx "
                            "it was compiled from")
        a.original = str(one)
    quantized = None
    if _default_tolerances(a, [a.original]):  # activations quantized at run time are judged as compile does
        quantized = quantized_activation(onnx.load(str(a.original), load_external_data=False))
    checks = verify(a.bundle, a.original, batch=a.batch, seq=a.seq, seed=a.seed, atol=a.atol, rtol=a.rtol,
                    device=a.device, past=a.past)

    def passed(c) -> bool:  # quantized: the largest difference against the output's scale (see selfcheck.py)
        return c.max_abs <= QUANTIZED_ACTIVATIONS * max(1.0, c.scale) if quantized else c.ok

    ok = all(passed(c) for c in checks)
    if a.json:
        print(json.dumps({"passed": ok, "outputs": [c.__dict__ | {"ok": passed(c)} for c in checks]}, indent=2))
    else:
        print(f"{'output':24} {'shape':18} {'max abs diff':>12} {'max rel diff':>12} {'argmax agree':>12}  result")
        for c in checks:
            print(f"{c.name:24} {str(c.shape):18} {c.max_abs:12.3e} {c.max_rel:12.3e} {c.argmax_agree:12.2%}  "
                  f"{'PASS' if passed(c) else 'FAIL'}")
        tol = f"atol={a.atol}, rtol={a.rtol}"
        if quantized:
            print(f"note: {quantized} quantizes activations at run time: the permuted summation order can move a "
                  "value across a rounding boundary (one quantization step), so outputs are judged as the compile "
                  "self-check judges them; pass --atol and --rtol for an elementwise check")
            tol = f"max abs diff <= {QUANTIZED_ACTIVATIONS} x max(1, max |output|)"
        print(f"{'PASS' if ok else 'FAIL'}: original vs pre -> server -> post ({tol}, batch={a.batch}, seq={a.seq})")
    return 0 if ok else 1


def cmd_generate(a: argparse.Namespace) -> int:
    """Generate text privately: pre and post run here, the server graph keeps the permuted KV cache."""
    from stip.runtime.generate import Sampler, StipGenerator, stream
    from stip.runtime.multifile import MultiGenerator, is_multifile_bundle

    server = None
    if is_multifile_bundle(a.bundle):
        if a.server:  # stip serve of the bundle: one model per file, named MODEL_NAME.ROLE
            from stip.runtime.bundle_format import Manifest, find_client_dir
            from stip.runtime.multifile import RemoteChain
            from stip.runtime.remote import read_token

            roles = list(Manifest.read(find_client_dir(a.bundle) / "stip.json")["files"])
            server = RemoteChain(a.server, a.model_name, roles, token=read_token(a.token_file), ca_cert=a.ca_cert)
        gen = MultiGenerator(a.bundle, device=a.device, start_id=a.decoder_start_id, server=server)
    elif a.decoder_start_id is not None:
        raise StipError("--decoder-start-id: only for seq2seq bundles (several files)")
    elif a.server:
        from stip.runtime.remote import RemoteServer, read_token

        server = RemoteServer(a.server, a.model_name, token=read_token(a.token_file), ca_cert=a.ca_cert)
    if not is_multifile_bundle(a.bundle):
        gen = StipGenerator(a.bundle, device=a.device, server=server)
    if (a.prompt is None) == (a.prompt_ids is None):
        raise StipError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    if a.prompt is not None:
        prompt = gen.encode(a.prompt)
    else:
        try:
            prompt = [int(x) for x in a.prompt_ids.replace(" ", "").split(",") if x]
        except ValueError:
            raise StipError(f"--prompt-ids {a.prompt_ids}: expected comma-separated integers") from None
    if a.max_new_tokens < 1:
        raise StipError("--max-new-tokens must be at least 1")
    sampler = Sampler(a.temperature, a.top_k, a.top_p, a.seed)
    if a.prompt is not None:
        print(a.prompt, end="", flush=True)
    stream(gen, prompt, a.max_new_tokens, sampler)
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    """Run pre -> server -> post once on inputs from .npy/.npz files; the server may be remote (--server)."""
    import numpy as np

    feeds: dict = {}
    if a.inputs:
        if not Path(a.inputs).exists():
            raise StipError(f"{a.inputs}: no such file")
        with np.load(a.inputs) as z:
            feeds.update({k: z[k] for k in z.files})
    for item in a.input:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).exists():
            raise StipError(f"--input {item}: expected NAME=FILE.npy with an existing file")
        feeds[name] = np.load(path)
    if a.server:
        from stip.runtime.remote import RemoteClient, read_token

        outputs = RemoteClient(a.bundle, a.server, a.model_name, token=read_token(a.token_file),
                               ca_cert=a.ca_cert).run(feeds)
    else:
        from stip.runtime.bundle import LocalDeployment

        outputs = LocalDeployment(a.bundle, a.device).run(feeds)
    for name, value in outputs.items():
        print(f"{name}: {value.dtype}{list(value.shape)}")
    if a.output:
        np.savez(a.output, **outputs)
        print(f"wrote {a.output}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    """Serve a bundle's server graph over HTTP and gRPC on the KServe v2 / Open Inference Protocol (as Triton): health,
    metadata, JSON and binary tensors, server-held KV-cache sequences (sequence_id/start/end), Prometheus /metrics.
    Binds 127.0.0.1 by default; SERVER may be the bundle's server/ directory or the bundle itself, and NAME=DIR
    (repeatable) serves several bundles from one process."""
    from stip.runtime.serve import Limits, serve
    from stip.runtime.serve_limits import parse_size

    limits = Limits(max_batch=a.max_batch, max_seq=a.max_seq, max_request_bytes=a.max_request_bytes,
                    max_queue=a.max_queue, max_sequences=a.max_sequences, sequence_timeout=a.sequence_timeout,
                    workers=a.workers, max_sequences_per_client=a.max_sequences_per_client,
                    max_memory=parse_size(a.max_memory, "--max-memory"),
                    max_json_response_bytes=parse_size(a.max_json_response_bytes, "--max-json-response-bytes"),
                    max_buffered_bytes=parse_size(a.max_buffered_bytes, "--max-buffered-bytes"),
                    max_connections=a.max_connections, max_connections_per_client=a.max_connections_per_client,
                    header_timeout=a.header_timeout,
                    body_timeout=a.body_timeout, keep_alive=a.keep_alive)
    return serve(a.server, host=a.host, port=a.port, device=a.device, model_name=a.model_name, limits=limits,
                 threads=a.threads, io_binding=a.io_binding, log_level=a.log_level, access_log=a.access_log,
                 auth_tokens=a.auth_tokens, tls_cert=a.tls_cert, tls_key=a.tls_key, allowed_hosts=a.allowed_hosts,
                 grpc_port=a.grpc_port)


def cmd_export_triton(a: argparse.Namespace) -> int:
    """Write a Triton Inference Server model repository for a bundle's server graph: REPO/NAME/config.pbtxt (the
    key id as parameter stip_key_id) and REPO/NAME/1/model.onnx. Encoders: Triton's onnxruntime backend with dynamic
    batching. Decoders with a KV cache: Triton's Python backend running REPO/NAME/1/model.py, which keeps each
    sequence's permuted cache (sequence batcher; onnxruntime must be installed for the Python backend). Serve it
    with `tritonserver --model-repository REPO`; clients of `stip serve`, tritonclient included, work unchanged
    over HTTP or gRPC, and read the key id from the model config. No key material is written."""
    from stip.compiler.triton import export_triton

    dest = export_triton(a.bundle, a.output, name=a.model_name, max_batch_size=a.max_batch_size, force=a.force,
                         sequence_timeout=a.sequence_timeout, max_sequences=a.max_sequences)
    print(f"wrote {dest}/config.pbtxt and {dest}/1/")
    print(f"serve it: tritonserver --model-repository {Path(a.output).resolve()}")
    return 0


def cmd_export_kserve(a: argparse.Namespace) -> int:
    """Write a KServe InferenceService for a bundle's server graph, with Triton as the serving runtime: DIR/model-
    repository/ (export-triton's repository: upload it to --storage-uri), DIR/inferenceservice.yaml (modelFormat
    triton, the storage URI, resources, replicas) and, for a decoder on several replicas, DIR/destinationrule.yaml
    (an Istio consistent hash on the x-stip-sequence header that stip clients send, so that a sequence stays on the
    replica holding its KV cache; KServe has no session affinity of its own). Decoders default to one replica.
    No key material is written."""
    from stip.compiler.kserve import AFFINITY, MANIFEST, REPOSITORY, export_kserve

    dest = export_kserve(a.bundle, a.output, a.storage_uri, name=a.name, model_name=a.model_name,
                         namespace=a.namespace, replicas=a.replicas, cpu=a.cpu, memory=a.memory,
                         cpu_limit=a.cpu_limit, memory_limit=a.memory_limit, gpus=a.gpus, grpc=a.grpc,
                         runtime=a.runtime, force=a.force, max_batch_size=a.max_batch_size,
                         sequence_timeout=a.sequence_timeout, max_sequences=a.max_sequences)
    print(f"wrote {dest / MANIFEST} and {dest / REPOSITORY}/{a.model_name}/")
    print(f"1. upload {dest / REPOSITORY}/ to {a.storage_uri} (its {a.model_name}/ at the top)")
    rule = dest / AFFINITY
    print(f"2. kubectl apply -f {dest / MANIFEST}" + (f" -f {rule}" if rule.exists() else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stip", description="Compile ONNX Transformers into secure three-party "
                                "STIP deployments (Secure Transformer Inference Protocol).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, fn):
        sp = sub.add_parser(name, help=fn.__doc__, description=fn.__doc__)
        sp.set_defaults(fn=fn)
        return sp

    def io_flags(sp):
        sp.add_argument("--private", action="append", metavar="INPUT",
                        help="treat this graph input as private (repeatable; default: detected)")
        sp.add_argument("--public", action="append", metavar="INPUT",
                        help="treat this graph input as public metadata (repeatable)")

    c = add("compile", cmd_compile)
    c.add_argument("model", nargs="+", help="exported ONNX model (.onnx, external data next to it is read); or "
                   "several files of one model, or the directory optimum wrote them to (encoder_model.onnx, "
                   "decoder_model.onnx, decoder_with_past_model.onnx): one bundle, one key")
    c.add_argument("-o", "--output", required=True, help="bundle directory to create")
    c.add_argument("--force", action="store_true", help="replace an existing bundle (and its key)")
    c.add_argument("--external-data", choices=["auto", "always", "never"], default="auto",
                   help="store server weights in model.onnx.data (auto: when over 1 GiB)")
    c.add_argument("--shard-size", metavar="SIZE",
                   help="split the server's external data into files of at most SIZE (e.g. 2GB, 500MiB; a "
                   "tensor is never split): model-00001-of-0000N.onnx.data ...")
    c.add_argument("--head", choices=["server", "client"], default="server",
                   help="where the LM head runs: server (default, as in the paper: logits leave the server in "
                   "the secret vocabulary order) or client (the server never sees logits; the user pays "
                   "vocab x hidden multiply-adds per token and downloads the head)")
    c.add_argument("--tokenizer", metavar="DIR", help="tokenizer files to ship in client/ for text prompts")
    c.add_argument("--max-context", type=int, metavar="N",
                   help="longest prompt + generation (default: the position table's size, if any)")
    c.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the self-check. By default compile runs pre -> server -> post and the original in "
                   "onnxruntime on small random inputs (decoders through the KV cache) and writes nothing if an "
                   "output differs. The check loads both models side by side: on BERT-base (418 MiB, 2 CPU cores) "
                   "it adds about 7 s and raises peak memory from 0.95 to 2.2 GiB (about 5x the model file "
                   "instead of 2.3x). Skip it only for models too large for that, then run `stip verify`.")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    io_flags(c)

    i = add("inspect", cmd_inspect)
    i.add_argument("target", help="an .onnx model, or a bundle directory written by `stip compile`")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    io_flags(i)

    au = add("audit", cmd_audit)
    au.add_argument("bundle", help="bundle directory written by `stip compile` (with developer/key.npz)")
    au.add_argument("--reference", metavar="MODEL.onnx",
                    help="weights an attacker might hold: the public base, or the original to simulate public weights")
    au.add_argument("--samples", type=int, default=8, help="sample prompts of random token ids (default 8)")
    au.add_argument("--seq", type=int, default=16, help="tokens per sample prompt (default 16)")
    au.add_argument("--prompt", action="append", metavar="TEXT",
                    help="a text prompt instead of random ids (repeatable; needs a shipped tokenizer)")
    au.add_argument("--layers", type=int, default=1,
                    help="layer outputs to attack after layer 0's input (default 1: layer 0's output)")
    au.add_argument("--json", action="store_true", help="machine-readable output")
    au.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    gn = add("generate", cmd_generate)
    gn.add_argument("bundle", help="bundle directory of a decoder, written by `stip compile`")
    gn.add_argument("--prompt", help="text prompt (needs a bundle compiled with --tokenizer)")
    gn.add_argument("--prompt-ids", metavar="IDS", help="comma-separated token ids, e.g. 1,2,3")
    gn.add_argument("--max-new-tokens", type=int, default=32)
    gn.add_argument("--decoder-start-id", type=int, default=None, metavar="ID",
                    help="seq2seq bundles: the decoder's first token (default: decoder_start_token_id from the "
                    "config.json found beside the files at compile time)")
    gn.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy decoding")
    gn.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    gn.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    gn.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible runs)")
    gn.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="where the server graph runs (default: CUDA when a GPU is visible)")
    gn.add_argument("--server", metavar="URL", help="run the server graph remotely (stip serve / Triton), e.g. "
                    "http://127.0.0.1:8000, or grpc://127.0.0.1:8001 (Triton's gRPC); then BUNDLE may be just "
                    "the client/ directory")
    gn.add_argument("--model-name", default="stip", help="model name on the server (default: stip)")
    gn.add_argument("--token-file", metavar="FILE",
                    help="a file holding the bearer token for a server started with --auth-tokens")
    gn.add_argument("--ca-cert", metavar="PEM", help="CA certificate to trust for an https:// --server")

    rn = add("run", cmd_run)
    rn.add_argument("bundle", help="bundle directory (or its client/ directory with --server)")
    rn.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                    help="one model input from a .npy file (repeatable), or --inputs FILE.npz")
    rn.add_argument("--inputs", metavar="FILE.npz", help="all model inputs from one .npz file")
    rn.add_argument("-o", "--output", metavar="FILE.npz", help="write the outputs here")
    rn.add_argument("--server", metavar="URL", help="run the server graph remotely, e.g. http://127.0.0.1:8000 "
                    "or grpc://127.0.0.1:8001")
    rn.add_argument("--model-name", default="stip", help="model name on the server (default: stip)")
    rn.add_argument("--token-file", metavar="FILE",
                    help="a file holding the bearer token for a server started with --auth-tokens")
    rn.add_argument("--ca-cert", metavar="PEM", help="CA certificate to trust for an https:// --server")
    rn.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")

    v = add("verify", cmd_verify)
    v.add_argument("bundle", help="bundle directory written by `stip compile`")
    v.add_argument("--original", required=True, nargs="+",
                   help="the plaintext model the bundle was compiled from (several files or their directory for a "
                   "multi-file bundle)")
    v.add_argument("--batch", type=int, default=3, help="batch size of the random inputs (default 3)")
    v.add_argument("--seq", type=int, default=13, help="length of dynamic non-batch axes (default 13)")
    v.add_argument("--past", type=int, default=7,
                   help="decoders with a KV cache: prefill this many tokens first, then check --seq new ones")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--atol", type=float, help="absolute tolerance (default: 1e-4, or the self-check's tolerance for "
                   "the least precise float the graph computes in: 1e-2 fp16, 5e-2 bf16; 1e-2 when activations are "
                   "quantized at run time)")
    v.add_argument("--rtol", type=float, help="relative tolerance (default: as --atol)")
    v.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the server graph runs (default: CUDA when a GPU is visible)")
    v.add_argument("--json", action="store_true", help="machine-readable output")

    sv = add("serve", cmd_serve)
    sv.add_argument("server", nargs="+", metavar="SERVER",
                    help="a bundle's server/ directory (or the bundle); NAME=DIR to serve several under names")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    sv.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000, as Triton)")
    sv.add_argument("--grpc-port", type=int, default=8001, metavar="N",
                    help="gRPC port: KServe v2 GRPCInferenceService, as Triton's, so grpc://HOST:N works with "
                    "either server (default 8001, Triton's; 0: no gRPC endpoint). Same auth, TLS and limits")
    sv.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="where the server graph runs (default: CUDA when a GPU is visible)")
    sv.add_argument("--model-name", default="stip", help="the model's name in /v2/models/NAME (default stip)")
    sv.add_argument("--workers", type=int, default=2, help="threads running ONNX Runtime (default 2)")
    sv.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads per run (0: its default)")
    sv.add_argument("--max-queue", type=int, default=64,
                    help="requests waiting beyond the busy workers; more get 503 at once (default 64)")
    sv.add_argument("--max-batch", type=int, default=64, help="largest batch (dim 0) of a request (default 64)")
    sv.add_argument("--max-seq", type=int, default=2048,
                    help="largest dim 1 of a request (sequence length), and of a sequence's cache (default 2048)")
    sv.add_argument("--max-request-bytes", type=int, default=64 << 20,
                    help="largest request body; larger ones get 413 (default 64 MiB)")
    sv.add_argument("--max-sequences", type=int, default=256,
                    help="live generation sequences per model; new ones beyond get 429 (default 256)")
    sv.add_argument("--max-sequences-per-client", type=int, default=0, metavar="N",
                    help="with --auth-tokens: live sequences per model and client, so that one client cannot take "
                    "every slot (default 0: --max-sequences)")
    sv.add_argument("--sequence-timeout", type=float, default=300.0, metavar="SECONDS",
                    help="free a sequence idle this long (default 300)")
    sv.add_argument("--io-binding", choices=["auto", "on", "off"], default="auto",
                    help="keep KV caches on the device with ORT IO binding (auto: on CUDA)")
    sv.add_argument("--max-memory", default="4GiB", metavar="SIZE",
                    help="memory budget for request activations, responses and every live KV cache, estimated "
                    "from the graph before each request runs: 413 if a request can never fit, 503 while the budget "
                    "is in use (default 4GiB; the loaded model is not counted)")
    sv.add_argument("--max-json-response-bytes", default="16MiB", metavar="SIZE",
                    help="largest JSON response (binary outputs are not capped by this; default 16MiB)")
    sv.add_argument("--max-buffered-bytes", default="256MiB", metavar="SIZE",
                    help="request bodies being received, all connections together; 503 beyond (default 256MiB)")
    sv.add_argument("--max-connections", type=int, default=256,
                    help="open connections; more are answered 503 and closed (default 256)")
    sv.add_argument("--max-connections-per-client", type=int, default=64, metavar="N",
                    help="open connections from one client address (default 64; 0: no cap, e.g. behind a reverse "
                    "proxy, where every connection comes from the proxy)")
    sv.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                    help="close a connection whose request headers take longer (default 10)")
    sv.add_argument("--body-timeout", type=float, default=60.0, metavar="SECONDS",
                    help="answer 408 to a request whose body takes longer (default 60)")
    sv.add_argument("--keep-alive", type=float, default=5.0, metavar="SECONDS",
                    help="close an idle keep-alive connection after this long (default 5)")
    sv.add_argument("--auth-tokens", metavar="FILE",
                    help="require 'Authorization: Bearer TOKEN'; FILE holds 'NAME TOKEN' lines and is re-read when "
                    "it changes. Sequences belong to the NAME that started them")
    sv.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (with --tls-key)")
    sv.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    sv.add_argument("--allowed-hosts", action="append", metavar="HOST[,HOST]",
                    help="Host header values to accept besides localhost, 127.0.0.1 and [::1] (DNS rebinding "
                    "defence; default: also the --host address; '*' accepts any)")
    sv.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    sv.add_argument("--access-log", action="store_true", help="log every HTTP request")

    et = add("export-triton", cmd_export_triton)
    et.add_argument("bundle", help="bundle directory written by `stip compile` (or its server/ directory)")
    et.add_argument("-o", "--output", required=True, metavar="REPO", help="Triton model repository to write")
    et.add_argument("--model-name", default="stip", help="model name in the repository (default stip)")
    et.add_argument("--max-batch-size", type=int, default=None,
                    help="Triton max_batch_size (default: 8 for encoders, 0 when a tensor has no dynamic batch "
                    "dim; KV-cache decoders are always 0: one sequence per request)")
    et.add_argument("--sequence-timeout", type=float, default=300.0, metavar="SECONDS",
                    help="KV-cache graphs: max_sequence_idle_microseconds, in seconds (default 300)")
    et.add_argument("--max-sequences", type=int, default=64,
                    help="KV-cache graphs: sequences in flight at once (max_candidate_sequences, default 64)")
    et.add_argument("--force", action="store_true", help="write into a non-empty REPO, replacing REPO/NAME")

    ek = add("export-kserve", cmd_export_kserve)
    ek.add_argument("bundle", help="bundle directory written by `stip compile` (or its server/ directory)")
    ek.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to write (new, or empty)")
    ek.add_argument("--storage-uri", required=True, metavar="URI",
                    help="where you will upload DIR/model-repository/ (s3://, gs://, pvc://, https://, ...)")
    ek.add_argument("--name", default="stip", help="the InferenceService's name (default stip)")
    ek.add_argument("--namespace", help="Kubernetes namespace (default: kubectl's current one)")
    ek.add_argument("--model-name", default="stip", help="model name clients use, /v2/models/NAME (default stip)")
    ek.add_argument("--replicas", type=int, default=1,
                    help="most replicas (default 1). Decoders: >1 adds RawDeployment mode and an Istio "
                    "DestinationRule hashing on x-stip-sequence, so that a sequence stays on one replica")
    ek.add_argument("--cpu", default="1", help="CPU request (default 1)")
    ek.add_argument("--memory", default="2Gi", help="memory request (default 2Gi)")
    ek.add_argument("--cpu-limit", help="CPU limit (default: the request)")
    ek.add_argument("--memory-limit", help="memory limit (default: the request)")
    ek.add_argument("--gpus", type=int, default=0, help="nvidia.com/gpu limit (default 0)")
    ek.add_argument("--grpc", action="store_true",
                    help="serve KServe v2 gRPC (protocolVersion grpc-v2, port 9000 h2c) instead of HTTP")
    ek.add_argument("--runtime", help="a ServingRuntime name (default: KServe picks one for modelFormat triton, "
                    "e.g. kserve-tritonserver)")
    ek.add_argument("--max-batch-size", type=int, default=None, help="as export-triton")
    ek.add_argument("--sequence-timeout", type=float, default=300.0, metavar="SECONDS", help="as export-triton")
    ek.add_argument("--max-sequences", type=int, default=64, help="as export-triton")
    ek.add_argument("--force", action="store_true", help="replace DIR if it holds an earlier export-kserve output")
    return p


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = lambda message, *_a, **_k: f"stip: warning: {message}\n"
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except StipError as e:
        print(f"stip {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM during a compile (stip.compiler.output.Terminated)
        code = getattr(e, "exit_code", 130)
        print("stip: terminated" if code != 130 else "stip: interrupted", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
