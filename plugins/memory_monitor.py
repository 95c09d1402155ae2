"""The memory report of the seed notebook: GPU memory reserved at start and at peak, the part used
by training, and each as a share of the card. On CPU it reports the process's resident memory.
On several processes it runs on every rank and rank 0 reports each rank's peak."""

from __future__ import annotations

import time

from qtune.api import GIB, TrainingCallback, cuda_if_present, current_memory_gib, hookimpl, peak_rss_gib


class MemoryMonitor(TrainingCallback):
    name = "memory_monitor"
    description = "GPU memory reserved at start and at peak, training's share (process RSS on CPU)"
    every_rank = True  # each rank measures its own device; rank 0 reports them all

    def on_train_start(self, run):
        self.started = time.perf_counter()
        cuda = cuda_if_present()
        if cuda is not None:
            props = cuda.get_device_properties(cuda.current_device())
            self.total = props.total_memory / GIB
            self.start = cuda.max_memory_reserved() / GIB
            run.console.print(f"GPU = {props.name}. Max memory = {self.total:.3f} GB.")
            run.console.print(f"{self.start:.3f} GB of memory reserved.")
        else:
            self.total = None
            self.start = current_memory_gib()
            run.console.print(f"CPU training. {self.start:.3f} GB resident at start.")

    def on_train_end(self, run):
        cuda = cuda_if_present()
        if cuda is not None:
            peak = cuda.max_memory_reserved() / GIB
            report = {
                "device": cuda.get_device_name(cuda.current_device()),
                "total_gib": round(self.total, 3),
                "start_reserved_gib": round(self.start, 3),
                "peak_reserved_gib": round(peak, 3),
                "training_reserved_gib": round(peak - self.start, 3),
                "peak_percent": round(100 * peak / self.total, 3),
                "training_percent": round(100 * (peak - self.start) / self.total, 3),
            }
            lines = [
                f"Peak reserved memory = {peak:.3f} GB.",
                f"Peak reserved memory for training = {peak - self.start:.3f} GB.",
                f"Peak reserved memory % of max memory = {report['peak_percent']} %.",
                f"Peak reserved memory for training % of max memory = {report['training_percent']} %.",
            ]
        else:
            peak = peak_rss_gib()
            report = {
                "device": "cpu",
                "start_rss_gib": round(self.start, 3),
                "peak_rss_gib": round(peak, 3),
                "training_rss_gib": round(max(peak - self.start, 0.0), 3),
            }
            lines = [f"Peak resident memory = {peak:.3f} GB ({max(peak - self.start, 0.0):.3f} GB more than at start)."]
        runtime = round(time.perf_counter() - self.started, 2)
        report["train_seconds"] = runtime
        lines.insert(0, f"{runtime} seconds used for training ({runtime / 60:.2f} minutes).")
        peaks = run.gather(round(peak, 3))  # every rank's peak, in rank order
        if len(peaks) > 1:
            report["rank_peaks_gib"] = peaks
            kind = "reserved" if cuda is not None else "resident"
            lines.append(f"Peak {kind} memory by rank: " + ", ".join(f"{rank}: {value:.3f} GB" for rank, value in enumerate(peaks)) + ".")
        for line in lines:
            run.console.print(line)
        run.summary["memory"] = report


@hookimpl
def register_callbacks(register):
    register(MemoryMonitor)
