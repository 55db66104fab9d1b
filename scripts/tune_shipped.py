"""Regenerate the pre-tuned database shipped in ``lowbit/backends/tvm/tuned/`` for this machine's x86 target.

Compiles the demo model (all-MiniLM-L6-v2 with the demo's compile inputs, so the same
kernel shapes as ``lowbit demo``) with each default x86 recipe, tuning every low-bit
kernel with the recipe's ``tune`` budget in a fresh cache directory, then copies the
resulting database over the shipped file of this target. The tuning starts from the
shipped file's records (so a run for some recipes keeps the others' records and only
tunes what is missing) unless ``--fresh``. The recipes that need calibration get the
demo's compile inputs as their one calibration batch.

Run: ``python scripts/tune_shipped.py`` (``--recipes w4a16-x86``, ``--trials N`` to
change the budget). Set ``TVM_NUM_THREADS`` as the compiled models will run.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

import lowbit
from lowbit import demo, recipes, zoo
from lowbit.backends.tvm.target import resolve_target
from lowbit.backends.tvm.tuning import SHIPPED_DIR, TuningDatabase
from lowbit.backends.tvm.tuning.database import SUBDIR, canonical_target, database_file_name

log = logging.getLogger("scripts.tune_shipped")

RECIPES = ("w4a16-x86", "w4a8-x86", "w2a8-x86", "w1.58a8-x86", "w8a8-x86")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--trials", type=int, default=None, help="trials per kernel (default: each recipe's)")
    parser.add_argument("--fresh", action="store_true", help="delete this target's shipped file and start empty")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    minilm = zoo.load_minilm()
    batch = minilm.tokenizer(
        demo.COMPILE_SENTENCES, padding="max_length", max_length=demo.SEQ_LEN, truncation=True, return_tensors="pt"
    )
    example = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    target = resolve_target("x86")
    name = database_file_name(canonical_target(target))
    if args.fresh:
        (SHIPPED_DIR / name).unlink(missing_ok=True)  # compiles would otherwise read it as the shipped layer
    with tempfile.TemporaryDirectory() as cache:
        if (SHIPPED_DIR / name).is_file():
            (Path(cache) / SUBDIR).mkdir()
            shutil.copyfile(SHIPPED_DIR / name, Path(cache) / SUBDIR / name)
        for recipe in args.recipes:
            tune = {"trials": args.trials} if args.trials is not None else True
            needs_data = any(p.requires_calibration for p in recipes.load(recipe).build("convert"))
            log.info("compiling the demo model with %s, tuning its kernels", recipe)
            lowbit.compile(
                minilm.model,
                (),
                example_kwargs=example,
                recipe=recipe,
                target="x86",
                tune=tune,
                cache_dir=cache,
                calibration=[example] if needs_data else None,
            )
        for record in TuningDatabase(target, cache, shipped=()).records():
            best = record.best
            log.info(
                "%s %s: %d trials, best %s (%.3f ms)",
                record.kernel,
                record.spec,
                record.counted,
                best.knobs if best else None,
                best.seconds * 1e3 if best else float("nan"),
            )
        SHIPPED_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(cache) / SUBDIR / name, SHIPPED_DIR / name)
    log.info("wrote %s", SHIPPED_DIR / name)


if __name__ == "__main__":
    main()
