"""The Model tab without gradio: the served checkpoint's card, configuration and AP per stage."""

from __future__ import annotations

import json

from istr_viz.demo_logic.served import DemoData, ServedModel

AP_COLUMNS = ["stage", "box AP", "box AP50", "box AP75", "mask AP", "mask AP50", "mask AP75"]


def ap_rows(metrics: dict) -> list[list]:
    """One row per stage (``AP_COLUMNS``, AP in percent, 1 decimal) of ``evaluate_results``'
    metrics; [] when the checkpoint stores no evaluation."""
    rows = []
    for entry in (metrics or {}).get("per_stage", []):
        b, s = entry["bbox"], entry["segm"]
        rows.append([int(entry["stage"])] + [round(100 * float(d[key]), 1)
                                             for d in (b, s) for key in ("AP", "AP50", "AP75")])
    return rows


def config_dict(served: ServedModel) -> dict:
    """The checkpoint's configuration as plain data ({} without a model)."""
    return served.config.to_dict() if served.ok else {}


def machine_line(machine: dict) -> str:
    """One machine of :func:`istr_viz.runtime.machine_summary` in words: CPU, logical CPUs,
    the flags that pick CPU kernels, torch, and the GPU where there was one."""
    flags = machine.get("cpu_flags")
    parts = [str(machine.get("cpu") or "unknown CPU")]
    if machine.get("logical_cpus"):
        parts.append(f"{machine['logical_cpus']} logical CPUs")
    parts.append("CPU flags unknown" if flags is None else
                 "flags " + (" ".join(flags) if flags else "none of avx2 / avx512 / amx"))
    if machine.get("torch"):
        parts.append(f"torch {machine['torch']}")
    if machine.get("gpu"):
        parts.append(f"GPU {machine['gpu']}")
    return ", ".join(parts)


def model_card(served: ServedModel, data: DemoData) -> str:
    """Markdown: the checkpoint, what it was trained on, its model, basis and evaluation."""
    if not served.ok:
        return served.message
    p, cfg = served.predictor, served.config
    params = sum(t.numel() for t in p.model.parameters())
    record = served.data_record
    lines = [
        f"### `{served.path.name}`",
        f"- **file**: `{served.path}`",
        f"- **trained**: {served.iteration if served.iteration is not None else 'unknown'} "
        f"iterations, batch {cfg.train.batch_size}, lr {cfg.train.lr:g}",
        f"- **training data**: `{record.get('train_ann', 'not recorded')}`",
        f"- **val data**: `{record.get('val_ann', 'none')}`",
        *([f"- **started from**: `{served.started_from.get('path', '?')}` (SHA-256 "
           f"{str(served.started_from.get('sha256', '?'))[:12]}...)"] if served.started_from else []),
        f"- **classes** ({len(p.class_names)}): "
        + ", ".join(f"{n} (id {i})" for n, i in zip(p.class_names, p.category_ids)),
        f"- **model**: {cfg.model.backbone} (width {cfg.model.backbone_base_channels}, "
        f"{cfg.model.norm}), {cfg.model.num_queries} queries, {cfg.model.num_stages} stages, "
        f"hidden {cfg.model.hidden_dim}, mask head `{cfg.model.mask_head}`; "
        f"{params / 1e6:.2f} M parameters",
        f"- **mask basis**: {p.model.basis.dim} components of {p.model.basis.mask_size} x "
        f"{p.model.basis.mask_size} masks, recipe `{p.model.basis.recipe}`",
        f"- **input size**: shorter side {cfg.data.test_min_size}, longer at most "
        f"{cfg.data.test_max_size} pixels",
        *([f"- **median training instance**: {served.trained_median_px:.1f} px (the square root "
           f"of its area, at the middle training size; a run that starts from this checkpoint "
           f"matches it: `data.median_object_px`)"] if served.trained_median_px else []),
        *(["- **trained on**: " + "; then ".join(machine_line(m) for m in served.machines)]
          if served.machines else []),
        f"- **served on**: {p.device}",
    ]
    metrics = p.metrics or {}
    if metrics.get("per_stage"):
        lines.append(f"- **final stage**: box AP {100 * metrics['bbox']['AP']:.1f}, mask AP "
                     f"{100 * metrics['segm']['AP']:.1f} (percent; per stage below)")
    else:
        lines.append("- **evaluation**: none stored in this checkpoint; run `python -m istr_viz "
                     f"evaluate --checkpoint {served.path}`")
    for key, value in served.card.items():  # what an exported checkpoint says about itself
        if (key == "init_from" and served.started_from) or (key == "machines" and served.machines) \
                or (key == "trained_median_px" and served.trained_median_px):
            continue  # (their lines are above)
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        lines.append(f"- **{key}** (card): {text[:300]}")
    if data.ok and not data.categories_match(p):
        lines.append(f"- **note**: the data set `{data.root}` has other categories "
                     f"({', '.join(data.val_annotations.class_names)})")
    return "\n".join(lines)


__all__ = ["AP_COLUMNS", "ap_rows", "config_dict", "machine_line", "model_card"]
