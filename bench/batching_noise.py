"""Batched and serial fold training give the same accuracy within seed noise (#15's statistical
test), on a synthetic set: pooled UF1 of a LOSO run per seed, for each path, then a Welch
t-test and a permutation test on the two samples of seed scores.

    python bench/batching_noise.py [--seeds 12] [--epochs 15] [--subjects 8] [--clips 96]
                                   [--device cpu] [--control] [--workdir /tmp/mexp-batching-noise]

Model: STSTNet on the apex-minus-onset image (28 px, one channel), class-weighted AdamW,
flip/shift augmentation: the random streams of the two paths differ (augmentation draws), so
their per-seed scores differ; their means should not. Seed s trains fold k with seed s + k on
both paths (as `mexp.engine.crossval` does). `--control` trains the batched path on shuffled
training labels instead: a difference the test must detect (its power check).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from _setup import workdir


def setup(work, subjects: int, clips: int, epochs: int, device: str):
    from mexp.config import Config, SynthConfig
    from mexp.data.datasets import load_dataset
    from mexp.data.inputs import images
    from mexp.engine.plans import make_plan
    from mexp.synthesize import generate
    root = work / "synthetic"
    if not (root / "done").exists():
        generate(SynthConfig(subjects=subjects, clips=clips, frames=10, image_size=28, seed=5),
                 root)
        (root / "done").touch()
    cfg = Config()
    cfg.data.root, cfg.data.image_size, cfg.data.sequence_length = str(root), 28, 6
    cfg.data.input, cfg.data.cache_dir, cfg.data.augmentation = "diff", str(work / "cache"), True
    cfg.model.name, cfg.model.input_channels = "ststnet", 1
    t = cfg.training
    t.epochs, t.val_fraction, t.cv_method, t.device = epochs, 0.0, "LOSO", device
    t.class_weighted, t.optimizer, t.weight_decay = True, "adamw", 1e-4
    cs = load_dataset(cfg.data)
    x = images(cfg, cs)[np.arange(len(cs)), cs.apex]
    plan = make_plan(list(cs.table.sample_id), list(cs.groups), list(cs.labels), method="LOSO",
                     n_folds=5, seed=0, val_fraction=0.0)
    return cfg, cs, x, plan


def seed_scores(cfg, cs, x, plan, seeds, path: str, shuffle_labels: bool = False) -> list[float]:
    """Pooled UF1 of one LOSO run per seed, on the `serial` or `batched` path.
    `shuffle_labels` permutes the training labels (a negative control: chance accuracy)."""
    from mexp.data.inputs import images_to_tensor, make_augment
    from mexp.engine import batched as fb
    from mexp.engine.crossval import fit_rows
    from mexp.engine.metrics import scores
    from mexp.models.build import build_cnn
    y, ids, nc = cs.labels, cs.table.sample_id.to_numpy(), len(cs.classes)
    pos = {s: i for i, s in enumerate(ids)}
    rows = [tuple(np.array([pos[i] for i in s], np.int64) for s in
                  (f.train_ids, f.val_ids, f.test_ids)) for f in plan.folds]
    y_fit = np.random.default_rng(0).permutation(y) if shuffle_labels else y
    make = lambda: build_cnn(cfg, x.shape[-1], nc)                          # noqa: E731
    out = []
    for s in seeds:
        cfg.training.seed, probs = s, np.zeros((len(y), nc))
        if path == "batched":
            reps = [fb.Replica(tr, va, te, seed=s + k) for k, (tr, va, te) in enumerate(rows)]
            for rep, res in zip(reps, fb.fit_batched(make, x, y_fit, reps, cfg.training, nc,
                                                     images_to_tensor, "frames")):
                probs[rep.test_idx] = res.probs
        else:
            for k, (f, r) in enumerate(zip(plan.folds, rows)):
                got = fit_rows(cfg, k, f, make, x, y_fit, ids, r, images_to_tensor,
                               make_augment("frames"))
                probs[r[2]] = got.probs
        out.append(scores(y, probs.argmax(1), nc)["uf1"])
    return out


def noise_test(a: list[float], b: list[float], n_perm: int = 20000, seed: int = 0) -> dict:
    """Welch's t-test and a two-sided permutation test of the mean difference."""
    from scipy import stats
    a, b = np.asarray(a), np.asarray(b)
    diff = float(a.mean() - b.mean())
    both, rng = np.concatenate([a, b]), np.random.default_rng(seed)
    perm = np.array([(lambda p: p[:len(a)].mean() - p[len(a):].mean())(rng.permutation(both))
                     for _ in range(n_perm)])
    return {"diff": diff, "welch_p": float(stats.ttest_ind(a, b, equal_var=False).pvalue),
            "perm_p": float((np.abs(perm) >= abs(diff) - 1e-12).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--clips", type=int, default=96)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--control", action="store_true", help="batched on shuffled labels")
    ap.add_argument("--workdir", default="")
    a = ap.parse_args()
    import mexp.engine.training as engine
    engine.SHOW_PROGRESS = False
    cfg, cs, x, plan = setup(workdir(a.workdir, "mexp-batching-noise-", tracking=False),
                             a.subjects, a.clips, a.epochs, a.device)
    got = {}
    for path in ("serial", "batched"):
        t = time.perf_counter()
        got[path] = seed_scores(cfg, cs, x, plan, range(a.seeds), path,
                                shuffle_labels=a.control and path == "batched")
        print(f"{path:8s} UF1 per seed {np.round(got[path], 3).tolist()}  mean "
              f"{np.mean(got[path]):.4f} sd {np.std(got[path], ddof=1):.4f}  "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    r = noise_test(got["serial"], got["batched"])
    print(f"{len(cs)} samples, {len(plan.folds)} LOSO folds, {a.seeds} seeds a path, "
          f"{'CONTROL (batched on shuffled labels), ' if a.control else ''}"
          f"{a.epochs} epochs: serial - batched UF1 {r['diff']:+.4f}, Welch p = "
          f"{r['welch_p']:.3f}, permutation p = {r['perm_p']:.3f}")


if __name__ == "__main__":
    main()
