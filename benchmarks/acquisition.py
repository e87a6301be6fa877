"""How fast and how exact is ``saal_scores``? One command, one table.

    .venv/bin/python benchmarks/acquisition.py            # full run (~7 min on 2 CPU cores)
    .venv/bin/python benchmarks/acquisition.py --quick    # smaller pools, no memory column (~1 min)

For each model (``small_cnn`` and the CIFAR-style ``resnet18``, both on 28x28 one-channel images, and ``bert_like``,
a two-layer BERT-style text encoder on padded 32-token sequences) the script first
trains the model briefly (Fashion-MNIST, synthetic images if the files are missing; for the text model a synthetic
keyword task, ``benchmarks/bert_like.py``), so that BatchNorm has real running statistics and the rankings mean
something. Then, for both balls (plain = paper, adaptive = authors' code), it times side by side in this one
process, with a warm-up call and the median of several repeats:

* ``loop``: the one-item-at-a-time reference (``benchmarks/reference_loop.py``), once with oneDNN on and once
  off (oneDNN's batch-1 path is slow on some CPUs); speed-ups are against the faster of the two;
* ``saal_scores`` with each exact engine (``hooks``, ``vmap``) and each approximation (``first_order``,
  ``last_layer``), default chunking;
* two floors that compute no SAAL score: ``entropy`` (one batched forward) and ``fwd+bwd`` (one batched forward and
  backward of the pseudo-label loss, batch 128).

Columns: ms per item; speed-up over the best loop; peak memory; for exact engines the largest relative difference
from the loop on the items the loop scored; for approximations (and entropy) Spearman's rank correlation and the
top-k overlap with the exact scores over the whole pool. Peak memory is the increase of the process's resident set
high-water mark (``VmHWM`` reset via ``/proc/self/clear_refs``, else ``ru_maxrss``) during one call over the pool,
measured in a fresh subprocess per row after the model and pool are loaded: all torch CPU allocations plus
allocator and page effects, not only the tensors alive at the peak. On CUDA it is the peak of
``torch.cuda.max_memory_allocated`` instead.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bert_like import BertLikeConfig, BertLikeForSequenceClassification, keyword_task  # noqa: E402
from benchmarks.reference_loop import reference_saal_scores  # noqa: E402
from saal_lightning.acquisition.saal_score import saal_scores  # noqa: E402
from saal_lightning.models.backbones import build_backbone  # noqa: E402

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# oneDNN's flag setter warns about Intel-GPU TF32 on every toggle; irrelevant here.
warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")

# Per model: training items and epochs, pool size, items the loop scores, timed repeats.
FULL = {
    "small_cnn": {"train": 10000, "epochs": 2, "pool": 2000, "loop": 200, "repeats": 3},
    "resnet18": {"train": 3000, "epochs": 1, "pool": 256, "loop": 32, "repeats": 3},
    "bert_like": {"train": 10000, "epochs": 2, "pool": 1000, "loop": 100, "repeats": 3},
}
QUICK = {
    "small_cnn": {"train": 2000, "epochs": 1, "pool": 512, "loop": 64, "repeats": 3},
    "resnet18": {"train": 512, "epochs": 1, "pool": 64, "loop": 8, "repeats": 2},
    "bert_like": {"train": 2000, "epochs": 2, "pool": 256, "loop": 32, "repeats": 3},
}
# The text model: a tiny BERT (2 layers, 4 heads, width 64, 1,000-token vocabulary) on sequences of 32 tokens.
TEXT_CONFIG = BertLikeConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=256, max_position_embeddings=64, num_labels=4)
TEXT_LENGTH = 32
TEXT_MODELS = ("bert_like",)
APPROXIMATIONS = ("first_order", "last_layer")
EXACT = ("hooks", "vmap")
TOP_K = {"top10": lambda n: min(10, n), "top10%": lambda n: max(1, round(n / 10))}


def load_fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Normalised [N, 1, 28, 28] images and labels; seeded synthetic blobs if the files are not there."""
    try:
        with gzip.open(FASHION_MNIST / f"{split}-images-idx3-ubyte.gz") as f:
            images = torch.frombuffer(bytearray(f.read()[16:]), dtype=torch.uint8)
        with gzip.open(FASHION_MNIST / f"{split}-labels-idx1-ubyte.gz") as f:
            labels = torch.frombuffer(bytearray(f.read()[8:]), dtype=torch.uint8).long()
    except OSError:
        generator = torch.Generator().manual_seed(0 if split == "train" else 1)
        labels = torch.randint(0, 10, (10000,), generator=generator)
        centers = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(2))
        images = centers[labels] + torch.randn(10000, 1, 28, 28, generator=generator)
        return images, labels, "synthetic"
    images = images.view(-1, 1, 28, 28).float().div(255)
    return (images - 0.2860) / 0.3530, labels, "fashion-mnist"


def build_model(name: str) -> nn.Module:
    if name in TEXT_MODELS:
        return BertLikeForSequenceClassification(TEXT_CONFIG)
    return build_backbone(name, num_classes=10, in_channels=1)


def text_data(train_items: int, pool_items: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(training ids, labels, pool ids, pool labels) of the synthetic keyword task, seeded."""
    ids, labels = keyword_task(train_items, TEXT_LENGTH, TEXT_CONFIG, torch.Generator().manual_seed(0))
    pool, pool_labels = keyword_task(pool_items, TEXT_LENGTH, TEXT_CONFIG, torch.Generator().manual_seed(1))
    return ids, labels, pool, pool_labels


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, device: torch.device) -> None:
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=generator).split(64):
            loss = F.cross_entropy(model(images[batch].to(device)), labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms_per_item(fn: Callable[[torch.Tensor], object], items: torch.Tensor, warmup: torch.Tensor,
                       repeats: int) -> tuple[float, object]:
    """Median wall time per item over ``repeats`` calls after one warm-up call, and the last call's result."""
    fn(warmup)
    times = []
    for _ in range(repeats):
        synchronize(items.device)
        start = time.perf_counter()
        result = fn(items)
        synchronize(items.device)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / len(items), result


def entropy(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        log_p = torch.cat([F.log_softmax(model(b), dim=1) for b in x.split(256)])
    return -(log_p.exp() * log_p).sum(1)


def forward_backward(model: nn.Module, x: torch.Tensor) -> None:
    for batch in x.split(128):
        logits = model(batch)
        F.cross_entropy(logits, logits.argmax(1)).backward()
    model.zero_grad(set_to_none=True)


def onednn(enabled: bool, device: torch.device):
    return torch.backends.mkldnn.flags(enabled=enabled) if device.type == "cpu" else nullcontext()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    positions = torch.arange(len(a), dtype=torch.float64)
    ranks = [torch.empty_like(positions).scatter_(0, v.argsort(), positions) for v in (a, b)]
    return torch.corrcoef(torch.stack(ranks))[0, 1].item()


def top_k_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    return len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist())) / k


def method_runner(name: str, model: nn.Module, adaptive: bool, device: torch.device) -> Callable[[torch.Tensor],
                                                                                              torch.Tensor]:
    """The function each table row times: items -> scores (or nothing, for fwd+bwd)."""
    if name.startswith("loop"):
        enabled = name == "loop-onednn-on"

        def loop(x: torch.Tensor) -> torch.Tensor:
            with onednn(enabled, device):
                return reference_saal_scores(model, x, adaptive=adaptive)

        return loop
    if name == "entropy":
        return lambda x: entropy(model, x)
    if name == "fwd+bwd":
        return lambda x: forward_backward(model, x)
    return lambda x: saal_scores(model, x, adaptive=adaptive, method=name)


# ----------------------------------------------------------------------------------------------- memory probes


def _memory_probe(spec_path: str) -> None:
    """Child process: load model and pool, run one method once, print the peak memory increase in bytes."""
    spec = json.loads(Path(spec_path).read_text())
    device = torch.device(spec["device"])
    model = build_model(spec["model"]).to(device)
    model.load_state_dict(torch.load(spec["state"], map_location=device))
    model.eval()
    pool = torch.load(spec["pool"], map_location=device)
    run = method_runner(spec["method"], model, spec["adaptive"], device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run(pool)
        print(json.dumps({"peak": torch.cuda.max_memory_allocated(device) - before}))
        return
    try:  # writing 5 resets VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        before = _proc_status_kib("VmRSS")
        run(pool)
        peak = _proc_status_kib("VmHWM") - before
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run(pool)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"peak": peak * 1024}))


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def measure_memory(spec: dict, workdir: Path) -> float:
    """Peak extra memory (MiB) of one method in a fresh process."""
    path = workdir / "spec.json"
    path.write_text(json.dumps(spec))
    out = subprocess.run([sys.executable, __file__, "--memory-probe", str(path)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"] / 2**20


# ----------------------------------------------------------------------------------------------- the table


def benchmark_model(name: str, config: dict, data: tuple, device: torch.device, memory: bool,
                    workdir: Path) -> list[dict]:
    images, labels, test_images, test_labels = text_data(config["train"], config["pool"]) if name in TEXT_MODELS \
        else data
    torch.manual_seed(0)
    model = build_model(name).to(device)
    start = time.perf_counter()
    train(model, images[: config["train"]], labels[: config["train"]], config["epochs"], device)
    with torch.no_grad():
        held_out = test_images[:512].to(device)
        accuracy = (model(held_out).argmax(1).cpu() == test_labels[: len(held_out)]).float().mean().item()
    print(f"# {name}: trained on {config['train']} items x {config['epochs']} epoch(s) in "
          f"{time.perf_counter() - start:.0f} s, held-out accuracy {accuracy:.1%}", flush=True)
    pool = test_images[: config["pool"]].to(device)
    loop_items = pool[: config["loop"]]
    if memory:
        torch.save(model.state_dict(), workdir / "state.pt")
        torch.save(pool, workdir / "pool.pt")
        torch.save(loop_items, workdir / "loop_items.pt")
    rows = []

    def row(method: str, ball: str, items: torch.Tensor) -> tuple[dict, object]:
        run = method_runner(method, model, ball == "adaptive", device)
        ms, output = median_ms_per_item(run, items, items[:16], config["repeats"])
        result = {"model": name, "pool": len(pool), "items": len(items), "device": device.type, "ball": ball,
                  "method": method, "ms": ms}
        if memory:
            # The loop's memory does not grow with the number of items, so its probe scores only its own items.
            spec = {"model": name, "state": str(workdir / "state.pt"), "method": method,
                    "pool": str(workdir / ("loop_items.pt" if method.startswith("loop") else "pool.pt")),
                    "adaptive": ball == "adaptive", "device": str(device)}
            result["memory"] = measure_memory(spec, workdir)
        rows.append(result)
        print(f"#   {ball:8s} {method:16s} {ms:9.2f} ms/item", flush=True)
        return result, output

    entropy_row, entropy_scores = row("entropy", "-", pool)
    floor, _ = row("fwd+bwd", "-", pool)
    for ball in ("plain", "adaptive"):
        loops = [row(method, ball, loop_items) for method in ("loop-onednn-on", "loop-onednn-off")]
        loop_scores = loops[0][1]
        exact = None
        for method in (*EXACT, *APPROXIMATIONS):
            r, scores = row(method, ball, pool)
            if method in EXACT:
                r["vs_loop"] = ((scores[: len(loop_items)] - loop_scores).abs() / loop_scores.abs()).max().item()
                exact = scores if method == "hooks" else exact
            else:
                r["agreement"] = [_agreement(scores, exact)]
        entropy_row.setdefault("agreement", []).append(_agreement(entropy_scores, exact))
        best_loop = min((r for r, _ in loops), key=lambda r: r["ms"])
        for r in rows:
            if r["ball"] == ball:
                r["speedup"] = best_loop["ms"] / r["ms"]
    for r in rows:
        r["x_floor"] = r["ms"] / floor["ms"]
    return rows


def _agreement(scores: torch.Tensor, exact: torch.Tensor) -> dict:
    out = {"spearman": spearman(scores, exact)}
    out.update({key: top_k_overlap(scores, exact, k(len(exact))) for key, k in TOP_K.items()})
    return out


def print_table(rows: list[dict], memory: bool) -> None:
    header = ["model", "items", "device", "ball", "method", "ms/item", "vs loop", "x fwd+bwd", "peak MiB",
              "max rel diff vs loop", "spearman", "top-10", "top-10%"]
    lines = [header]
    for r in rows:
        agreements = r.get("agreement", [])
        agree = [" / ".join(f"{a[key]:.3f}" if key == "spearman" else f"{a[key]:.2f}" for a in agreements)
                 for key in ("spearman", "top10", "top10%")]
        lines.append([
            r["model"], f"{r['items']}/{r['pool']}", r["device"], r["ball"], r["method"], f"{r['ms']:.2f}",
            f"{r['speedup']:.2f}x" if "speedup" in r else "", f"{r['x_floor']:.2f}",
            f"{r['memory']:.0f}" if memory else "-", f"{r['vs_loop']:.1e}" if "vs_loop" in r else "", *agree,
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small pools and no memory column (about a minute)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                        help="measure peak memory in subprocesses (default: on, off with --quick)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--models", nargs="+", default=list(FULL), choices=list(FULL))
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        _memory_probe(args.memory_probe)
        return
    device = torch.device(args.device)
    memory = not args.quick if args.memory is None else args.memory
    configs = QUICK if args.quick else FULL
    images, labels, source = load_fashion_mnist("train")
    test_images, test_labels, _ = load_fashion_mnist("t10k")
    started = datetime.now(timezone.utc)
    print(f"# {started:%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{cpu_name()}, device {device}, data: {source} (text: synthetic keyword task), float32")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            rows += benchmark_model(name, configs[name], (images, labels, test_images, test_labels), device, memory,
                                    Path(workdir))
    print()
    print_table(rows, memory)
    print(f"\n# items: scored/pool (the loops score the first items of the pool). vs loop: speed-up over the faster "
          f"loop row of the same model and ball. x fwd+bwd: time over one batched forward+backward. Agreement: "
          f"Spearman and top-k overlap with the exact (hooks) scores over the pool; for entropy 'plain / adaptive'. "
          f"Total {time.perf_counter() - _T0:.0f} s.")


_T0 = time.perf_counter()

if __name__ == "__main__":
    main()
