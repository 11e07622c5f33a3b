"""The benchmark's report as people read it: benchmark.md (one table per stage, then the workers' peak memory) and
scaling.png (throughput against workers). Both are rendered from the report dict alone, to bytes; the stages write
them through the output store.
"""

from __future__ import annotations

import io
from typing import Any


def scaling_png(scaling: dict[str, Any]) -> bytes:
    """scaling.png: throughput against workers, with the line that perfect scaling from one worker would follow."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    ticks: set[int] = set()
    for key, what in (("cpu", f"CPU actors, 1 decoder each ({scaling['cpu_detector']})"),
                      ("gpu", f"GPU actors, 1 GPU each ({scaling['gpu_detector']})")):
        points = scaling[key] or []
        if not points:
            continue
        workers = [p["workers"] for p in points]
        rates = [p["photos_per_s"] for p in points]
        (line,) = ax.plot(workers, rates, marker="o", label=what)
        ax.plot(workers, [rates[0] * w for w in workers], linestyle="--", color=line.get_color(), alpha=0.5,
                label=f"{key.upper()}: linear from 1")
        ticks.update(workers)
    ax.set_xticks(sorted(ticks))
    ax.set_ylim(bottom=0)
    ax.set(xlabel="workers", ylabel="photos/s", title=f"kemo preprocess, {scaling['photos']} photos")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def markdown(report: dict[str, Any]) -> str:
    """benchmark.md: one table per stage, then the peak memory of the workers of every Ray run."""
    m = report["machine"]
    gpus = f" ×{m['gpus']}" if m["gpus"] > 1 else ""
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores for Ray ({m['logical_cpus']} logical CPUs), "
             f"{m['memory_gib']} GiB, {m['gpu']}{gpus}, Python {m['python']}."]
    if "decode" in report:
        lines += _decode_markdown(report)
    if "detect" in report:
        lines += _detect_markdown(report)
    if "detectors" in report:
        lines += ["", *_preprocess_markdown(report)]
    if "scaling" in report:
        lines += _scaling_markdown(report)
    if "train" in report:
        lines += _train_markdown(report)
    if "label" in report:
        lines += _label_markdown(report)
    if "video" in report:
        lines += _video_markdown(report)
    if "scale" in report:
        lines += _scale_markdown(report)
    lines += _sampled_markdown(report)
    return "\n".join(lines) + "\n"


def _decode_markdown(report: dict[str, Any]) -> list[str]:
    d, cores = report["decode"], report["machine"]["cores"]
    sizes = list(d)
    lines = ["", "Decode alone: kemo's decoder against the plain loop's (cv2 straight to RGB), one core.", "",
             f"| photos | kemo decoder | kemo, photos/s per core | plain, photos/s per core | kemo / plain | "
             f"kemo on {cores} cores |", "|---|---|---|---|---|---|"]
    lines += [f"| {s}: {d[s]['photos']} | {d[s]['decoder']} | {d[s]['kemo_photos_per_s_one_core']} | "
              f"{d[s]['plain_photos_per_s_one_core']} | {d[s]['ratio_vs_plain']}× | "
              f"{d[s]['kemo_photos_per_s_all_cores']} |" for s in sizes]
    lines += ["", "Decode, ms per photo on one core:", "", "| method | " + " | ".join(f"{s} ms" for s in sizes) + " |",
              "|---|" + "---|" * len(sizes)]
    lines += [f"| {k} | " + " | ".join(str(d[s]["ms_per_photo_one_core"][k]) for s in sizes) + " |"
              for k in d[sizes[0]]["ms_per_photo_one_core"]]
    return lines


def _detect_markdown(report: dict[str, Any]) -> list[str]:
    lines = ["", "Detectors alone, on decoded photos (preparing the input is timed apart, on one core): kemo's batch "
             "against one photo at a time, same device and threads.", ""]
    if not report["detect"]:
        return lines + ["No detector that looks at pixels was asked for (yolo, haar)."]
    lines += ["| detector | device | half precision | threads | batch | kemo, images/s | one at a time, images/s | "
              "kemo / plain | input preparation, ms |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | {d['device']} | {'yes' if d['half_precision'] else 'no'} | {d['threads']} | {d['batch']} | "
              f"{d['kemo_images_per_s']} | {d['plain_images_per_s']} | {d['ratio_vs_plain']}× | "
              f"{d['prepare_ms_per_photo_one_core']} |" for k, d in report["detect"].items()]
    return lines


def _preprocess_markdown(report: dict[str, Any]) -> list[str]:
    m = report["machine"]
    lines = [f"Preprocessing {report['photos']} generated {report['size']} photos on {m['cores']} cores "
             f"({m['cpu']}, Python {m['python']}). Photos/s end to end (kemo: Ray Data start-up included), and "
             f"steady (plain loop: photos beyond the first third; kemo: between its first and last shard).", "",
             "| detector | plain loop | kemo | kemo / plain | plain, steady | kemo, steady "
             "| kemo / plain, steady | kemo fixed cost | slowest stage alone | kemo steady / it "
             "| all stages on all cores | kemo steady / it |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in report["detectors"].items():
        c = d["stage_ceilings_photos_per_s"]
        lines.append(f"| {name} | {d['plain_loop_photos_per_s']} | {d['kemo_photos_per_s']} | {d['ratio_vs_plain']}× | "
                     f"{d['plain_loop_steady_photos_per_s']} | {d['kemo_steady_photos_per_s']} | "
                     f"{d['steady_ratio_vs_plain']}× | {d['kemo_fixed_cost_s']} s | {d['slowest_stage']}: "
                     f"{c[d['slowest_stage']]} | {d['steady_share_of_slowest_stage']:.0%} | "
                     f"{c['all stages on all cores']} | {d['steady_share_of_all_stages_bound']:.0%} |")
    r = next(iter(report["detectors"].values()))["resources"] if report["detectors"] else None
    if r:
        lines += ["", f"kemo's resources (its defaults on this cluster): {_resources_text(r)}."]
    return lines


def _resources_text(r: dict[str, Any]) -> str:
    return (f"actors {r['actors']}, decoder threads per actor {r['decoders']}, GPUs per actor {r['gpus_per_actor']:g}, "
            f"batch {r['batch_size']}, batches in flight per actor {r['calls_per_actor']}")


def _statuses_text(statuses: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in statuses.items())


def _scaling_markdown(report: dict[str, Any]) -> list[str]:
    s = report["scaling"]
    lines = ["", f"Scaling: kemo's preprocess job on the same {s['photos']} photos, photos/s (steady where the run "
             "shows three shards or more, else end to end); speedup against one worker, efficiency = speedup / "
             "workers.", "", "| workers | detector | actors × decoders, GPUs each | photos/s | speedup | efficiency |",
             "|---|---|---|---|---|---|"]
    for key, name in (("cpu", s["cpu_detector"]), ("gpu", s["gpu_detector"])):
        for p in s[key] or []:
            r = p["resources"]
            lines.append(f"| {p['workers']} {key.upper()} | {name} | {r['actors']} × {r['decoders']}, "
                         f"{r['gpus_per_actor']:g} | {p['photos_per_s']}{'' if p['steady'] else ' (end to end)'} | "
                         f"{p['speedup']}× | {p['efficiency']:.0%} |")
    if s["gpu_note"]:
        lines += ["", f"GPU scaling: {s['gpu_note']}."]
    return lines + ["", "![throughput against workers](scaling.png)"]


def _train_markdown(report: dict[str, Any]) -> list[str]:
    t, m = report["train"], report["machine"]
    lines = ["", f"Classifier training: {t['model']} at {t['image_size']}², batch {t['batch']}, {t['images']} "
             f"images, {t['epochs']} epochs (the first not counted), {t['device']}, {t['precision']}, "
             f"{m['cores']} cores. kemo's input: {t['input']}; the plain loop's: arrays in its own memory.", "",
             "| path | images/s | vs plain loop |", "|---|---|---|",
             f"| plain PyTorch loop (mean of before and after: {t['plain_loop_images_per_s_before_after']}) | "
             f"{t['plain_loop_images_per_s']} | 1.0× |",
             f"| kemo, Ray Train: training steps | {t['kemo_images_per_s']} | {t['ratio_vs_plain']}× |",
             f"| kemo, Ray Train: whole epoch (+ validation, checkpoint) | {t['kemo_epoch_images_per_s']} | "
             f"{t['epoch_ratio_vs_plain']}× |"]
    lines.append(f"| kemo's data path alone (no model) | {t['data_path_images_per_s']} | "
                 f"{t['data_path_vs_model']}×: "
                 f"{'data-bound' if t['data_bound'] else 'not data-bound'} |")
    if t["plain_loop_channels_last_images_per_s"] is not None:
        lines.append(f"| plain PyTorch loop, channels_last | {t['plain_loop_channels_last_images_per_s']} | "
                     f"{t['channels_last_ratio_vs_plain']}× |")
    return lines + [
        "", f"Ray Train's fixed cost (worker group start, data from the object store, shutdown): "
        f"{t['kemo_fixed_cost_s']} s of {t['kemo_wall_s']} s. channels_last: "
        + ("timed in the plain loop only; kemo's Ray Train loop would need a RunSpec field and "
           "`model.to(memory_format=torch.channels_last)` after `create_model` in "
           "kemo/classifier/train.py's train_loop."
           if t["plain_loop_channels_last_images_per_s"] is not None else "no GPU, not timed.")]


def _label_markdown(report: dict[str, Any]) -> list[str]:
    d, r = report["label"], report["label"]["resources"]
    c, ms = d["ceilings_photos_per_s"], d["ms_per_photo_one_core"]
    gpu = f" ({', '.join(d['on_gpu'])} on the GPU)" if d["on_gpu"] else ""
    return ["", f"Labelling {d['photos']} photos: {d['detector']} → crop → {d['classifier']} at {d['image_size']}² "
            f"(random weights): kemo's label job ({_resources_text(r)}) against a plain loop (cv2.imread → the same "
            f"detector → crop → the same classifier, one photo at a time). kemo's photos: "
            f"{_statuses_text(d['statuses'])}.", "",
            "| detector | plain loop | kemo | kemo / plain | plain, steady | kemo, steady | kemo / plain, steady "
            "| kemo fixed cost | slowest stage alone | kemo steady / it | all stages on all cores | kemo steady / it |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {d['detector']} | {d['plain_loop_photos_per_s']} | {d['kemo_photos_per_s']} | {d['ratio_vs_plain']}× | "
            f"{d['plain_loop_steady_photos_per_s']} | {d['kemo_steady_photos_per_s']} | {d['steady_ratio_vs_plain']}× "
            f"| {d['kemo_fixed_cost_s']} s | {d['slowest_stage']}: {c[d['slowest_stage']]} | "
            f"{d['steady_share_of_slowest_stage']:.0%} | {c['all stages on all cores']} | "
            f"{d['steady_share_of_all_stages_bound']:.0%} |", "",
            f"Inside the labelling actor{gpu}: each phase alone through the actor's own methods, one core; photos/s "
            "scaled to all cores.", "", "| phase | " + " | ".join(ms) + " |", "|---|" + "---|" * len(ms),
            "| ms per photo, one core | " + " | ".join(str(v) for v in ms.values()) + " |",
            "| photos/s alone, all cores | " + " | ".join(str(c[k]) for k in ms) + " |"]


def _video_markdown(report: dict[str, Any]) -> list[str]:
    v = report["video"]
    d = v["decode_only"]
    return ["", f"Labelling video: {v['clips']} clips ({v['clip']}) sampled at {v['sample_fps']} frames a second of "
            f"presentation time, {v['detector']} → crop → {v['classifier']} at {v['image_size']}² (random weights): "
            f"kemo's label job (segments of {v['segment_seconds']} s, over {v['segment_actors']} actor(s)) against a "
            "plain loop (cv2.VideoCapture → the same detector → crop → the same classifier, frame by frame). Videos: "
            f"{_statuses_text(v['video_statuses'])}.", "",
            "| frames sampled | plain loop, frames/s | kemo | kemo / plain | kemo, steady | kemo / plain, steady "
            "| decode only: PyAV / PyAV to RGB / cv2 frames/s |", "|---|---|---|---|---|---|---|",
            f"| {v['frames_sampled']} | {v['plain_loop_frames_per_s']} | {v['kemo_frames_per_s']} | "
            f"{v['ratio_vs_plain']}× | {v['kemo_steady_frames_per_s']} | {v['steady_ratio_vs_plain']}× | "
            f"{d['pyav_fps']} / {d['pyav_rgb_fps']} / {d['cv2_read_fps']} |"]


def _scale_markdown(report: dict[str, Any]) -> list[str]:
    s = report["scale"]
    n0, n, n10 = s["photos"]
    lines = ["", f"Scale: each job as its own driver at {n0} photos (its fixed cost), {n} and {n10} generated photos "
             f"of {s['photo_size']} ({'textured' if s['texture'] else 'plain'}), crops and training input at "
             f"{s['crop_and_training_size']}². Per-photo cost leaves the fixed cost out.", "",
             f"| stage | fixed cost | ms/photo at {n} | at {n10} | ratio | driver peak RSS MiB ({n0} / {n} / {n10}) "
             f"| ratio | largest worker MiB ({n0} / {n} / {n10}) |", "|---|---|---|---|---|---|---|---|"]
    for stage, e in s["stages"].items():
        workers = " / ".join(map(str, e["largest_worker_rss_mib"])) if e["largest_worker_rss_mib"][-1] else "no Ray"
        lines.append(f"| {stage.replace('_', ' ')} | {e['fixed_cost_s']} s | {e['ms_per_photo'][0]} | "
                     f"{e['ms_per_photo'][1]} | {e['cost_ratio_10x']}× | "
                     f"{' / '.join(map(str, e['driver_peak_rss_mib']))} | {e['driver_rss_ratio_10x']}× | "
                     f"{workers} |")
    t = s["stages"]["training_input"]["data_path_images_per_s"]
    return lines + [
        "", f"Index holds its manifest whole: {s['stages']['index']['driver_bytes_per_record']} bytes of driver "
        f"memory per record. Training input, images/s through a worker's data path (at {n} / {n10}): decoding "
        f"every crop (--cache none) {' / '.join(map(str, t['decode_images_per_s']))}, from the cache "
        f"(--cache memory) {' / '.join(map(str, t['cached_images_per_s']))}; the model trains "
        f"{s['model_images_per_s']} images/s at that size here, so without the cache training is "
        f"{'data-bound' if s['training_data_bound_without_cache'] else 'not data-bound'}.", *_incremental_lines(s)]


def _incremental_lines(s: dict[str, Any]) -> list[str]:
    """The labelling rerun that adds a few photos to an output of N and of 10×N, against a first run into an empty
    output: what the growth of a daily labelling job costs."""
    inc = s.get("label_incremental")
    if not inc:
        return []
    (_, n, n10), first, (a, b) = s["photos"], inc["first_run"], inc["reruns"]
    return ["", f"Labelling, incremental: {inc['added']} photos added to outputs of {n} and {n10} photos took "
            f"{a['seconds']} / {b['seconds']} s (driver read {a['driver_read_mib']} / {b['driver_read_mib']} MiB, "
            f"wrote {a['driver_written_mib']} / {b['driver_written_mib']} MiB), against {first['seconds']} s "
            f"({first['driver_read_mib']} MiB read, {first['driver_written_mib']} MiB written) for the same photos "
            f"into an empty output; 10×N / N: {inc['ratio_10x']['seconds']}× the time."]


def _sampled_runs(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    runs = [(f"preprocess, {k}", d["sampled"]) for k, d in report.get("detectors", {}).items()]
    for key in ("cpu", "gpu"):
        runs += [(f"scaling, {p['workers']} {key.upper()}", p["sampled"])
                 for p in (report.get("scaling", {}).get(key) or [])]
    return runs + [(stage, report[stage]["sampled"]) for stage in ("train", "label", "video")
                   if stage in report]


def _sampled_markdown(report: dict[str, Any]) -> list[str]:
    runs = _sampled_runs(report)
    if not runs:
        return []
    lines = ["", "Peak memory (RSS, MiB) of each Ray worker a run started on this node, sampled every "
             f"{report['config']['sample_every']} s; GPU utilisation over the same run.", "",
             "| run | largest worker | each worker | GPU utilisation mean / max | GPU memory max |",
             "|---|---|---|---|---|"]
    for name, s in runs:
        each: dict[str, list[str]] = {}
        for w in s["peak_rss_mib_per_worker"]:
            each.setdefault(w["name"].removeprefix("ray::"), []).append(f"{w['peak_rss_mib']:.0f}")
        gpu = "no GPU" if s["gpu_utilization_pct_mean"] is None else \
            f"{s['gpu_utilization_pct_mean']}% / {s['gpu_utilization_pct_max']:g}%"
        mem = "no GPU" if s["gpu_memory_used_mib_max"] is None else f"{s['gpu_memory_used_mib_max']} MiB"
        lines.append(f"| {name} | {s['peak_rss_mib']} | "
                     + "; ".join(f"{k}: {', '.join(v)}" for k, v in each.items()) + f" | {gpu} | {mem} |")
    return lines
