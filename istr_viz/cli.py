"""Command line: ``python -m istr_viz <command>`` or ``istr-viz <command>``.

Each subcommand converts its arguments to typed values and calls one library function. Every
:class:`~istr_viz.errors.IstrVizError` becomes one line ``error: <file>: <entry>: <reason>`` on
stderr and exit status 2; argparse's own usage errors also exit with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from istr_viz.errors import DataError, IstrVizError

if TYPE_CHECKING:  # for annotations; imported where used, as elsewhere in this module
    from istr_viz.config import Config

PREDICT_THRESHOLD = 0.4  # predict's score threshold for a checkpoint that records none


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2) + "\n")


def _cmd_make_shapes(args: argparse.Namespace) -> int:
    from istr_viz.data.shapes import make_shapes

    summary = make_shapes(
        Path(args.out), num_train=args.train, num_val=args.val, size=args.size, seed=args.seed
    )
    print(json.dumps(summary))
    return 0


def _dataset_paths(args: argparse.Namespace, split: str = "val", prefix: str = ""):
    """The (annotation file, image folder) pair from ``--ann/--images`` or ``--data ROOT``."""
    from istr_viz.data.layout import DatasetPaths, split_paths

    ann, images = getattr(args, f"{prefix}ann"), getattr(args, f"{prefix}images")
    if getattr(args, "data", None):
        if ann or images:
            raise DataError("give either --data or the annotation file and image folder, not both",
                            file=args.data)
        return split_paths(args.data, split)
    if not ann or not images:
        flag = prefix.replace("_", "-")
        raise DataError(f"give --{flag}ann FILE and --{flag}images DIR, or --data ROOT")
    return DatasetPaths(Path(ann), Path(images)).check_exists()


def _cmd_check_data(args: argparse.Namespace) -> int:
    """Print the summary; exit 2 with one line per problem when entries had to be skipped."""
    from istr_viz.data.check import check_dataset, format_summary

    paths = _dataset_paths(args, args.split)
    summary = check_dataset(paths.ann_file, paths.images_dir, progress=True)
    print(format_summary(summary))
    _write_json(args.json_out, summary)
    problems = summary["skipped"]
    for p in problems[:20]:
        print(f"error: {p['file']}: {p['entry']}: {p['reason']}", file=sys.stderr)
    if len(problems) > 20:
        print(f"error: ... and {len(problems) - 20} more problems (see the summary)", file=sys.stderr)
    return 2 if problems else 0


def _cmd_fit_basis(args: argparse.Namespace) -> int:
    """Exit 2 with one line for bad input: a missing or corrupt annotation file, an annotation
    entry that cannot be used (unless ``--skip-invalid``), a bad --dim / --mask-size or an
    output path that cannot be written."""
    from istr_viz.basis import fit_basis_from_coco

    ann = Path(args.ann)
    if args.images is not None and not Path(args.images).is_dir():
        raise DataError("image folder not found", file=args.images)
    if args.mask_size < 1:
        raise DataError(f"must be at least 1, got {args.mask_size}", entry="--mask-size")
    if not 1 <= args.dim <= args.mask_size ** 2:
        raise DataError(f"must be between 1 and mask_size ** 2 = {args.mask_size ** 2}, got "
                        f"{args.dim}", entry="--dim")
    if args.chunk_size is not None and args.chunk_size < args.dim:
        raise DataError(f"must be at least --dim ({args.dim}), got {args.chunk_size}",
                        entry="--chunk-size")
    for path in (args.out, args.json_out):
        if path:
            _check_writable(Path(path))
    basis, report = fit_basis_from_coco(
        ann, dim=args.dim, mask_size=args.mask_size, recipe=args.recipe, seed=args.seed,
        chunk_size=args.chunk_size, strict=not args.skip_invalid,
    )
    if report["n_skipped_annotations"]:
        print(f"warning: {ann}: skipped {report['n_skipped_annotations']} invalid annotations "
              "(check-data lists them)", file=sys.stderr)
    for path, write in ((args.out, lambda: basis.save(args.out)),
                        (args.json_out, lambda: _write_json(args.json_out, report))):
        try:
            write()
        except OSError as err:
            raise DataError(f"cannot write: {err.strerror or err}", file=path) from None
    measured = "held-out" if report["eval_on"] == "holdout" else "fitted"
    print(
        f"fitted dim={report['dim']} on {report['n_fit']} of {report['n_masks']} masks of "
        f"{report['mask_size']}x{report['mask_size']}: explained variance "
        f"{report['explained_variance_cumulative']:.3f}; reconstruction mIoU at k={report['dim']} "
        f"on {report['n_eval']} {measured} masks {report['recon_miou']:.4f} (DCT "
        f"{report['dct_miou_curve'][-1]:.4f}); saved {args.out}"
    )
    return 0


def _check_writable(path: Path) -> None:
    """Refuse, before any work, an output path that is a folder or whose folder cannot be made."""
    if path.is_dir():
        raise DataError("output path is a folder", file=path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the output folder: {err.strerror or err}",
                        file=path) from None
    if not os.access(path.parent, os.W_OK):
        raise DataError("output folder is not writable", file=path)


def _train_paths(args: argparse.Namespace):
    """(train, val or None) data sets: explicit files, ``--data ROOT``, or the built-in shapes."""
    from istr_viz.data.layout import DatasetPaths, default_data_root, split_paths

    explicit = args.train_ann or args.train_images
    if args.data and explicit:
        raise DataError("give either --data or --train-ann/--train-images, not both", file=args.data)
    if explicit:
        if not (args.train_ann and args.train_images):
            raise DataError("give both --train-ann FILE and --train-images DIR")
        train = DatasetPaths(Path(args.train_ann), Path(args.train_images)).check_exists()
        val = None
        if args.val_ann or args.val_images:
            if not (args.val_ann and args.val_images):
                raise DataError("give both --val-ann FILE and --val-images DIR")
            val = DatasetPaths(Path(args.val_ann), Path(args.val_images)).check_exists()
        return train, val
    root = Path(args.data) if args.data else default_data_root()
    return split_paths(root, "train"), split_paths(root, "val")


def _cmd_train(args: argparse.Namespace) -> int:
    from istr_viz.basis import MaskBasis
    from istr_viz.config import get_preset
    from istr_viz.engine import AUTO_START, train, training_start
    from istr_viz.evaluate import format_stage_table

    if args.max_iters is not None and args.max_minutes is not None:
        raise DataError("give --max-iters or --max-minutes, not both")
    given_data = args.data or args.train_ann or args.train_images
    if args.resume and (args.set or args.init_from or args.from_scratch or args.basis
                        or args.max_minutes is not None):
        raise DataError("--resume continues the run with its stored configuration, weights, "
                        "basis and budget (--max-iters may change the budget): drop --set, "
                        "--init-from, --from-scratch, --basis and --max-minutes", file=args.out)
    if args.resume and not given_data:
        from istr_viz.engine import resume_data

        train_paths, val_paths = resume_data(args.out)
    else:
        train_paths, val_paths = _train_paths(args)
    preset = get_preset(args.preset)
    if args.resume:
        cfg, init_from = preset, None  # (the stored configuration replaces it)
    else:  # a checkpoint's architecture and basis replace the preset's, then --set applies
        # (a basis of one's own goes with one's own weights: no automatic start with --basis)
        wanted = None if args.from_scratch else args.init_from or (None if args.basis else AUTO_START)
        cfg, init_from = training_start(preset, args.set or [], train_paths.ann_file, wanted)
        if os.environ.get("RANK", "0") == "0" and wanted == AUTO_START:
            _say_where_training_starts(init_from, preset, args.set or [], cfg)
    if args.processes != 1:  # the children start where this process decided
        child = strip_start_flags(args.argv)
        if init_from is not None and wanted == AUTO_START:  # the automatic start's query rule
            child += ["--set", f"model.queries_per_instance={cfg.model.queries_per_instance}"]
        child += ["--init-from", str(init_from)] if init_from is not None else \
            [] if args.resume else ["--from-scratch"]
        return _launch_train(args, cfg, child)
    basis = MaskBasis.load(args.basis) if args.basis else None
    result = train(cfg, train_paths, args.out, val_data=val_paths, basis=basis,
                   init_from=init_from, resume=args.resume, max_iters=args.max_iters,
                   max_minutes=args.max_minutes, device=args.device,
                   suggest_shipped=not (args.from_scratch or args.basis))
    if os.environ.get("RANK", "0") != "0":  # under DDP, rank 0 reports
        return 0
    print(f"trained {result.iterations} iterations in {result.minutes:.1f} min; "
          f"checkpoint {result.last_checkpoint}")
    if result.metrics:
        print(format_stage_table(result.metrics))
    return 0


def _fine_tune_words(preset: Config, overrides: list[str], cfg: Config) -> str:
    """What a run from trained weights trains with, and which setting gave each: ``lr 2.8e-04
    (train.fine_tune_lr), weight average 0.995 (train.fine_tune_ema_decay), no lr drop
    (train.fine_tune_lr_gamma)``. ``cfg``: the run's configuration from ``training_start``."""
    from istr_viz.config import apply_overrides
    from istr_viz.engine import fine_tune_settings, schedule_words

    fine_tune = fine_tune_settings(apply_overrides(preset, overrides).train, overrides)
    sources = {name: f"train.fine_tune_{name}" if name in fine_tune else f"train.{name}"
               for name in ("lr", "ema_decay", "lr_gamma")}
    return schedule_words(cfg.train, sources)


def _say_where_training_starts(init_from: Path | None, preset: Config, overrides: list[str],
                               cfg: Config) -> None:
    """The line ``train`` prints where it chose the start itself: from the shipped model (with
    what it trains with, :func:`_fine_tune_words`), or from scratch because the shipped model is
    missing (a package installed without ``checkpoints/``)."""
    from istr_viz.engine import FINE_TUNE_EVIDENCE
    from istr_viz.predictor import SHIPPED_CHECKPOINT

    if init_from is not None:
        print(f"starting from the shipped model {init_from}: all its weights but the class heads "
              f"(and the per-query ones where the data raise the query count), and its mask basis "
              f"({FINE_TUNE_EVIDENCE}), at {_fine_tune_words(preset, overrides, cfg)}; "
              f"--from-scratch trains from scratch", file=sys.stderr, flush=True)
    elif not SHIPPED_CHECKPOINT.is_file():
        print(f"note: no shipped model at {SHIPPED_CHECKPOINT}: training from scratch",
              file=sys.stderr, flush=True)


def strip_start_flags(argv: list[str]) -> list[str]:
    """``argv`` without ``--init-from X`` / ``--init-from=X`` / ``--from-scratch``, for children
    that are told the start their parent chose."""
    def names(item: str, flag: str) -> bool:  # the flag or an abbreviation argparse takes
        name = item.split("=", 1)[0]
        return len(name) >= len("--in") and flag.startswith(name)

    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif names(item, "--from-scratch"):
            continue
        elif names(item, "--init-from"):
            skip = "=" not in item
        else:
            out.append(item)
    return out


def _launch_train(args: argparse.Namespace, cfg, argv: list[str]) -> int:
    """``train --processes N``: the checks a child would fail on, then N local DDP processes
    running ``argv``."""
    import torch

    from istr_viz.launch import launch_local, strip_processes_flag

    n = args.processes
    if n < 1:
        raise DataError(f"--processes must be at least 1, got {n}")
    # (a resumed run keeps its stored batch size, which the children check)
    if not args.resume and cfg.train.batch_size % n:
        raise DataError(f"train.batch_size={cfg.train.batch_size} does not split evenly over "
                        f"--processes {n}")
    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if on_gpu and n > torch.cuda.device_count():
        raise DataError(f"--processes {n} needs {n} GPUs; {torch.cuda.device_count()} visible")
    if not on_gpu and n > (os.cpu_count() or 1):
        print(f"warning: --processes {n} on {os.cpu_count()} CPU cores: they will share cores",
              file=sys.stderr)
    return launch_local(strip_processes_flag(argv), n)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from istr_viz.data.coco import load_annotations
    from istr_viz.evaluate import evaluate_model, format_stage_table
    from istr_viz.predictor import load_model

    paths = _dataset_paths(args, "val")
    model, predictor = load_model(args.checkpoint, device=args.device, test_size=args.test_size,
                                  maskness_power=args.maskness_power)
    ann = load_annotations(paths.ann_file)
    _check_classes_fit(args.checkpoint, predictor, ann)
    metrics = evaluate_model(model, paths, predictor.config, device=predictor.device,
                             results_out=args.results_out, category_ids=predictor.category_ids,
                             ceilings=args.ceilings, breakdown=args.breakdown)
    print(format_stage_table(metrics))
    for c in metrics["per_category"]:
        print(f"  {c['id']:>6} {c['name']:<20} box AP {100 * c['bbox_AP']:5.1f}  "
              f"mask AP {100 * c['segm_AP']:5.1f}")
    best = metrics.get("score_threshold")
    if best:
        print(f"best mask F1 at IoU {best['iou']:.2f}: {best['f1']:.3f} at score >= "
              f"{best['threshold']:.3f} (precision {best['precision']:.3f}, "
              f"recall {best['recall']:.3f})")
    if args.ceilings:
        from istr_viz.ceilings import format_ceilings

        print(format_ceilings(metrics["ceilings"], model.basis.mask_size, model.basis.dim))
    if args.breakdown:
        from istr_viz.breakdown import format_breakdown

        print(format_breakdown(metrics["breakdown"]))
    _write_json(args.json_out, metrics)
    return 0


def _check_classes_fit(checkpoint: str, predictor, ann) -> None:
    if list(predictor.category_ids) != list(ann.label_to_cat_id) or \
            list(predictor.class_names) != list(ann.class_names):
        raise DataError(
            f"the checkpoint's classes {dict(zip(predictor.category_ids, predictor.class_names))} "
            f"do not fit the data set's {dict(zip(ann.label_to_cat_id, ann.class_names))}; "
            "fine-tune with train --init-from", file=checkpoint)


def _cmd_predict(args: argparse.Namespace) -> int:
    from istr_viz.predictor import load_model, suggested_score_threshold
    from istr_viz.viz.figures import figure_to_png
    from istr_viz.viz.stages import plot_stage_grid

    _, predictor = load_model(args.checkpoint, device=args.device, test_size=args.test_size)
    if args.score_threshold is None:
        args.score_threshold = suggested_score_threshold(predictor.metrics, PREDICT_THRESHOLD)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for image in args.images:
        prediction = predictor.predict(Path(image), return_attention=False)
        if args.stage is not None and not 1 <= args.stage <= prediction.num_stages:
            raise DataError(f"--stage must be in 1..{prediction.num_stages}", entry=str(args.stage))
        stages = [args.stage] if args.stage else range(1, prediction.num_stages + 1)
        record = {"image": str(image), "height": prediction.size[0], "width": prediction.size[1],
                  "stages": [{"stage": k, "detections": prediction.to_records(k, args.score_threshold)}
                             for k in stages]}
        stem = Path(image).stem if args.images.count(image) == 1 and \
            [Path(i).stem for i in args.images].count(Path(image).stem) == 1 \
            else f"{args.images.index(image):03d}_{Path(image).stem}"
        _write_json(str(out / f"{stem}.json"), record)
        (out / f"{stem}_stages.png").write_bytes(
            figure_to_png(plot_stage_grid(prediction, args.score_threshold)))
        final = record["stages"][-1]
        print(f"{image}: {len(final['detections'])} detections at stage {final['stage']} "
              f"(score >= {args.score_threshold}) -> {out / (stem + '.json')}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from istr_viz.checkpoint import export_for_inference, load_checkpoint, save_checkpoint

    card = {}
    if args.card:
        try:
            card = json.loads(Path(args.card).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"not a readable JSON file ({err})", file=args.card) from None
        if not isinstance(card, dict):
            raise DataError("the card must be a JSON object", file=args.card)
    retest = args.test_size is not None or args.maskness_power is not None
    if args.maskness_power is not None:  # a bad power is refused before any file is read
        from istr_viz.config import Config, with_maskness_power

        with_maskness_power(Config(), args.maskness_power)
    if not retest and (args.data or args.ann or args.images):
        raise DataError("--data, --ann and --images go with --test-size or --maskness-power (the "
                        "data to measure the metrics again on); without them the checkpoint's "
                        "metrics are kept")
    exported = export_for_inference(load_checkpoint(args.checkpoint), half=not args.fp32,
                                    card=card)
    if retest:
        from types import SimpleNamespace

        from istr_viz.data.coco import load_annotations
        from istr_viz.evaluate import retested_checkpoint

        if not (args.data or args.ann or args.images):
            given = (f"--test-size {args.test_size}" if args.test_size is not None
                     else f"--maskness-power {args.maskness_power}")
            raise DataError(f"{given.split()[0]} needs the val data to measure the metrics again "
                            "with it: add --data ROOT (or --ann FILE --images DIR)", entry=given)
        paths = _dataset_paths(args, "val")
        classes = SimpleNamespace(category_ids=exported.get("category_ids", []),
                                  class_names=exported.get("class_names", []))
        _check_classes_fit(args.checkpoint, classes, load_annotations(paths.ann_file))
        # measured on the weights as exported (float16 unless --fp32), as they will be served
        exported = retested_checkpoint(exported, args.checkpoint, args.test_size, paths,
                                       maskness_power=args.maskness_power)
        final = exported["metrics"]["segm"]["AP"], exported["metrics"]["bbox"]["AP"]
        from istr_viz.config import Config

        stored = Config.from_dict(exported["config"])
        print(f"at {stored.data.test_min_size} px, maskness power "
              f"{stored.model.maskness_power:g}: mask AP {100 * final[0]:.1f}, "
              f"box AP {100 * final[1]:.1f}")
    out = save_checkpoint(args.out, **exported)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, "
          f"{'float32' if args.fp32 else 'float16'} weights, no training state)")
    return 0


MASKNESS_HELP = ("score each detection as its class probability x its mask's maskness to this "
                 "power (default: the checkpoint's model.maskness_power; 0 = the class "
                 "probability alone)")
TEST_SIZE_HELP = ("the shorter side, in pixels, that images are resized to (default: the "
                  "checkpoint's data.test_min_size); the longer side's cap is raised to keep "
                  "800:1333 where needed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="istr-viz",
        description="Train ISTR and look inside it: data sets, mask bases, models, visualisations.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("make-shapes", help="write the synthetic shapes data set in COCO format")
    from istr_viz.data import layout

    p.add_argument("--out", required=True, help="output root (gets train/ and val/)")
    p.add_argument("--train", type=int, default=layout.DEFAULT_SHAPES_TRAIN, help="training images")
    p.add_argument("--val", type=int, default=layout.DEFAULT_SHAPES_VAL, help="validation images")
    p.add_argument("--size", type=int, default=layout.DEFAULT_SHAPES_SIZE, help="image side in px")
    p.add_argument("--seed", type=int, default=layout.DEFAULT_SHAPES_SEED)
    p.set_defaults(func=_cmd_make_shapes)

    p = sub.add_parser("check-data", help="validate a COCO data set and summarise it")
    p.add_argument("--ann", help="COCO instances annotation file")
    p.add_argument("--images", help="folder the file_names are relative to")
    p.add_argument("--data", help="or a data set root holding train/ and val/")
    p.add_argument("--split", default="val", choices=["train", "val"], help="split of --data")
    p.add_argument("--json-out", help="also write the summary as JSON")
    p.set_defaults(func=_cmd_check_data)

    p = sub.add_parser("fit-basis", help="fit the PCA mask-embedding basis on a COCO data set")
    p.add_argument("--ann", required=True, help="COCO instances annotation file")
    p.add_argument("--images", help="image folder (not read: masks come from the annotations)")
    p.add_argument("--dim", type=int, default=60, help="basis size (embedding length)")
    p.add_argument("--mask-size", type=int, default=28, help="mask side S")
    p.add_argument("--recipe", choices=["istr", "binary"], default="istr",
                   help="istr: noisy logit space, whitened, sigmoid decode; binary: plain PCA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .npz file")
    p.add_argument("--json-out", help="also write the report as JSON")
    p.add_argument("--chunk-size", type=int, metavar="N",
                   help="stream the masks through IncrementalPCA in blocks of N (for data sets "
                        "whose masks do not fit in memory; default: all at once, plain PCA)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip unusable annotation entries (default: exit 2 naming the first)")
    p.set_defaults(func=_cmd_fit_basis)

    p = sub.add_parser("train", help="train ISTR on a COCO-format data set (default: built-in shapes)")
    g = p.add_argument_group("data (default: the built-in shapes)")
    g.add_argument("--train-ann", help="training annotation file")
    g.add_argument("--train-images", help="training image folder")
    g.add_argument("--val-ann", help="validation annotation file")
    g.add_argument("--val-images", help="validation image folder")
    g.add_argument("--data", help="or a data set root holding train/ and val/")
    p.add_argument("--preset", default="shapes-cpu", help="named configuration: shapes-cpu, coco-r50")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="change one configuration field, e.g. --set model.num_stages=4 (repeatable)")
    p.add_argument("--basis", help="mask basis .npz (default: the starting checkpoint's, or one "
                   "fitted on the training masks from scratch; a run given one starts from "
                   "scratch unless --init-from says otherwise)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--init-from", metavar="CHECKPOINT",
                       help="start from a checkpoint's weights (its class heads start afresh on "
                            "other classes); its model, basis and mask-target frame replace the "
                            "preset's; the lr is train.fine_tune_lr where set (shapes-cpu: "
                            "2.8e-4 against 4e-4 from scratch) unless --set train.lr says "
                            "otherwise; likewise train.fine_tune_ema_decay and "
                            "train.fine_tune_lr_gamma replace train.ema_decay and "
                            "train.lr_gamma (shapes-cpu: a 0.995 weight average and no lr drop, "
                            "against none and x0.1 from scratch). Default (also --init-from "
                            "auto): the shipped model where the data's classes are not its own "
                            "and the configuration has its weights (a printed line says so), "
                            "else from scratch")
    start.add_argument("--from-scratch", action="store_true",
                       help="train from scratch, also where the default would start from the "
                            "shipped model")
    p.add_argument("--max-iters", type=int, help="iterations to train (default: the preset's)")
    p.add_argument("--max-minutes", type=float,
                   help="minutes of training (evaluations not counted): the run stops, and "
                        "steps its lr, by the clock")
    p.add_argument("--out", required=True, help="output folder (last.pt, best.pt, metrics.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="train in N local DDP processes (CPU: one per core; GPU: one per GPU), "
                        "as torchrun --standalone --nproc_per_node=N does")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="COCO box and mask AP of a checkpoint, for every stage")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--ann", help="annotation file")
    p.add_argument("--images", help="image folder")
    p.add_argument("--data", help="or a data set root (its val/ split)")
    p.add_argument("--json-out", help="write the metrics as JSON")
    p.add_argument("--results-out", help="write the final stage's COCO results (boxes + RLE masks)")
    p.add_argument("--ceilings", action="store_true",
                   help="also report what caps the mask AP: the same detections with perfect "
                        "mask codes, and ground truth through the S x S crop and the basis")
    p.add_argument("--breakdown", action="store_true",
                   help="also report where the AP goes: the AP with class errors corrected, "
                        "at IoU 0.1, and the share of instances that no detection touches")
    p.add_argument("--test-size", type=int, metavar="PX", help=TEST_SIZE_HELP)
    p.add_argument("--maskness-power", type=float, metavar="P", help=MASKNESS_HELP)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=_cmd_evaluate, split="val")

    p = sub.add_parser("export", help="an inference-only checkpoint to ship (float16, no "
                       "training state)")
    p.add_argument("checkpoint", help="a training checkpoint (last.pt or best.pt)")
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument("--fp32", action="store_true", help="keep float32 weights")
    p.add_argument("--card", help="JSON object stored as the checkpoint's card (data, command, ...)")
    p.add_argument("--test-size", type=int, metavar="PX",
                   help="store another test size (the shorter side, in pixels); the stored "
                        "metrics are measured again at it on the val data given by --data")
    p.add_argument("--maskness-power", type=float, metavar="P",
                   help="store another maskness power (model.maskness_power); the stored "
                        "metrics are measured again with it on the val data given by --data")
    p.add_argument("--data", help="a data set root (its val/ split), with --test-size or "
                                  "--maskness-power")
    p.add_argument("--ann", help="or its annotation file, with --images")
    p.add_argument("--images", help="and its image folder")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("predict", help="predict images: a per-stage figure and a JSON each")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="keep detections scoring at least this (default: the threshold the "
                        f"checkpoint's final evaluation chose, else {PREDICT_THRESHOLD})")
    p.add_argument("--stage", type=int, help="only this stage in the JSON (1..K; default all)")
    p.add_argument("--test-size", type=int, metavar="PX", help=TEST_SIZE_HELP)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=_cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; return the exit status (0 ok, 2 bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except IstrVizError as err:
        print(f"error: {err.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
