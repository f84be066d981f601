"""`python -m fastvit demo`: the main job.

With a CUDA GPU it times fastvit against the eager reference and timm eager for a ViT and prints
images/s (the benchmarks add torch.compile(timm): benchmarks/gpu_check.sh). Without one it says so, runs
every kernel through the Triton interpreter on a small ViT and prints parity per op and for the whole
model, counts launches per forward, and times the torch fallback against timm on the CPU.
"""
import argparse
import math
import os
import sys
import time


def _ensure_interpreter_without_gpu(argv):
    """The Triton interpreter must be switched on before triton is imported: without a GPU, re-exec
    this command once with TRITON_INTERPRET=1 (importing fastvit has already imported triton)."""
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "fastvit", *argv])


def _table(rows, header):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))


def _max_err(a, b):
    return f"{(a.double() - b.double()).abs().max().item():.2e}"


def _op_parity_rows(torch):
    """Each fused op on random inputs, Triton vs the torch backend (both fp32), forward and gradients."""
    from fastvit import ops, use_backend

    g = torch.Generator().manual_seed(0)
    B, N, D, H = 2, 17, 64, 4
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    images, pw, pb, pos, cls = r(B, 3, 32, 32), r(D, 3, 8, 8) * 0.05, r(D), r(1, 17, D) * 0.02, r(1, 1, D)
    x, lw, lb, w, b, w2, b2 = r(B, N, D), r(D) + 1, r(D), r(3 * D, D) * 0.1, r(3 * D), r(D, 4 * D) * 0.05, r(D)
    cases = {
        "patch_embed (+pos, cls)": (ops.patch_embed, (images, pw, pb, pos, cls)),
        "layer_norm": (ops.layer_norm, (x, lw, lb, 1e-6)),
        "layer_norm_linear (LN1 > qkv)": (ops.layer_norm_linear, (x, lw, lb, w, b)),
        "qkv_attention": (lambda qkv: ops.qkv_attention(qkv, H), (r(B, N, 3 * D),)),
        "layer_norm_linear > gelu (fc1)": (lambda *a: ops.layer_norm_linear(*a, activation="gelu"), (x, lw, lb, w, b)),
        "linear + residual (fc2)": (lambda a, w_, b_, res: ops.linear(a, w_, b_, residual=res), (r(B, N, 4 * D), w2, b2, x)),
        "layer_norm_mlp + residual (MLP branch)": (
            lambda x_, *a: ops.layer_norm_mlp(x_, *a, residual=x_), (x, lw, lb, r(4 * D, D) * 0.1, r(4 * D), w2, b2)),
    }
    rows = []
    for name, (fn, args) in cases.items():
        results = {}
        for backend in ("triton", "torch"):
            leaves = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
            with use_backend(backend):
                out = fn(*leaves)
            out.backward(torch.ones_like(out))
            results[backend] = (out, [a.grad for a in leaves if isinstance(a, torch.Tensor)])
        (out_t, grads_t), (out_r, grads_r) = results["triton"], results["torch"]
        grad_err = max(float(_max_err(a, b)) for a, b in zip(grads_t, grads_r))
        rows.append((name, tuple(out_t.shape), _max_err(out_t, out_r), f"{grad_err:.2e}"))
    return rows


def _model_parity(torch):
    import timm

    import fastvit
    from fastvit import reference

    cfg = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    torch.manual_seed(0)
    timm_model = timm.models.vision_transformer.VisionTransformer(**cfg).eval()
    ref = reference.VisionTransformer(**cfg).eval()
    ref.load_state_dict(timm_model.state_dict())
    model = fastvit.from_timm(timm_model).eval()
    images = torch.randn(2, 3, 32, 32)
    with fastvit.use_backend("triton"), fastvit.count_launches() as launches:  # whatever FASTVIT_BACKEND says
        logits = model(images)
    rows = [
        ("fastvit (triton, interpreted) vs reference", _max_err(logits, ref(images))),
        ("fastvit (triton, interpreted) vs timm", _max_err(logits, timm_model(images))),
    ]
    return rows, launches, cfg


def _per_kernel(launches) -> str:
    """'_kernel_a x2, _kernel_b x9' for a fastvit.count_launches counter."""
    return ", ".join(f"{k} x{v}" for k, v in sorted(launches.by_kernel.items()))


def _vit_base_traffic(torch) -> str:
    """Launches and modelled HBM bytes of a ViT-B/16 bf16 forward at batch 256: a dry run through the
    interpreter (launches counted, programs not run), so the full size costs only allocations."""
    import fastvit

    model = fastvit.create_model("vit_base_patch16_224").eval().bfloat16()
    with torch.inference_mode(), fastvit.use_backend("triton"), fastvit.count_launches(dry_run=True) as launches:
        model(torch.empty(256, 3, 224, 224, dtype=torch.bfloat16))
    return (f"\nViT-B/16 forward, batch 256, bf16 (counted without running): {launches.total} launches "
            f"({_per_kernel(launches)}),\n{launches.bytes / 1e9:.1f} GB modelled HBM traffic (each launch's tensors moved "
            f"once; `pytest benchmarks/` compares timm eager under the same model)")  # fmt: skip


def _images_per_second(models, images, rounds):
    """Best-of-`rounds` images/s of each model, the models timed in alternation after one warm-up call
    each, so background load on a shared CPU hits them alike and the best round filters it out."""
    best = [math.inf] * len(models)
    for model in models:
        model(images)
    for _ in range(rounds):
        for i, model in enumerate(models):
            start = time.perf_counter()
            model(images)
            best[i] = min(best[i], time.perf_counter() - start)
    return [images.shape[0] / t for t in best]


def demo_cpu():
    import timm
    import torch

    import fastvit

    print("No CUDA GPU found: the Triton kernels run through the Triton interpreter on the CPU, which")
    print("checks correctness only (interpreter time says nothing about GPU speed).\n")
    print("Per-op parity, Triton kernels vs the torch backend, fp32 (forward and every input gradient):")
    _table(_op_parity_rows(torch), ("op", "output shape", "max |err| out", "max |err| grads"))

    rows, launches, cfg = _model_parity(torch)
    print(f"\nWhole-model parity, tiny ViT {cfg}:")
    _table(rows, ("comparison", "max |err| logits"))
    print(f"\nTriton launches per forward: {launches.total} for depth {cfg['depth']} ({_per_kernel(launches)})")
    print(_vit_base_traffic(torch))

    print("\nCPU throughput, vit_tiny_patch16_224, batch 8, fp32, inference (torch fallback backend):")
    torch.manual_seed(0)
    timm_model = timm.create_model("vit_tiny_patch16_224").eval()
    model = fastvit.from_timm(timm_model).eval()
    images = torch.randn(8, 3, 224, 224)
    with torch.inference_mode(), fastvit.use_backend("torch"):
        ours, theirs = _images_per_second((model, timm_model), images, rounds=5)
    rows = [("fastvit (torch backend)", f"{ours:.1f}"), ("timm", f"{theirs:.1f}")]
    _table(rows, ("model", "images/s"))
    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPU cores. Run `make bench` on a GPU machine for GPU figures.")


def demo_gpu(name, batch):
    import timm
    import torch

    import fastvit
    from fastvit import reference

    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}: {name}, batch {batch}, bf16 inference\n")
    torch.manual_seed(0)
    timm_model = timm.create_model(name).to(device).eval()
    model = fastvit.from_timm(timm_model).to(device).eval()
    ref = reference.VisionTransformer(**fastvit.model.MODEL_CONFIGS[name]).to(device).eval()
    ref.load_state_dict(timm_model.state_dict())
    images = torch.randn(batch, 3, *model.patch_embed.img_size, device=device)

    def timed(m):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(3):
                m(images)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                out = m(images)
            end.record()
            torch.cuda.synchronize()
        return out, 10 * batch / (start.elapsed_time(end) / 1e3)

    out_fast, fast = timed(model)
    out_timm, timm_speed = timed(timm_model)
    _, ref_speed = timed(ref)
    rows = [("fastvit", f"{fast:.0f}", "1.00"), ("timm (eager, SDPA)", f"{timm_speed:.0f}", f"{fast / timm_speed:.2f}"),
            ("eager reference", f"{ref_speed:.0f}", f"{fast / ref_speed:.2f}")]  # fmt: skip
    _table(rows, ("model", "images/s", "fastvit speed-up"))
    print(f"\nmax |logits fastvit - timm| (bf16): {_max_err(out_fast.float(), out_timm.float())}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m fastvit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="parity and throughput on this machine")
    demo.add_argument("--model", default="vit_base_patch16_224", help="the ViT timed on a GPU (GPU only)")
    demo.add_argument("--batch", type=int, default=64, help="the batch timed on a GPU (GPU only)")
    args = parser.parse_args(argv)
    _ensure_interpreter_without_gpu(argv)

    import torch

    if torch.cuda.is_available():
        demo_gpu(args.model, args.batch)
    else:
        demo_cpu()


if __name__ == "__main__":
    main()
