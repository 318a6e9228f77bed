"""Where every stage reads and writes, relative to the project root."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Everyday runs record here (git-ignored); studies record under results/<study>/ (committed).
RUNS_DIR = "runs"


def method_slug(method: str) -> str:
    """File-name form of a method name (kept as is, so DVC foreach paths match)."""
    return method


def _under(folder: str, *parts: str, doc: str) -> property:
    """A read-only path property: `parts` below the Paths attribute `folder`."""

    def get(self: Paths) -> Path:
        return Path(getattr(self, folder), *parts)

    return property(get, doc=doc)


@dataclass(frozen=True)
class Paths:
    """The project's file layout: data/ and models/ (DVC outs), metrics/ and plots/."""

    root: Path
    results_dir: Path | None = None  # where run records go (default: results/runs/)
    # a named extra QuEST level (student.quest.extra_levels): its own features and codebook
    # under data/levels/<level>/ and models/levels/<level>/; "" is the first level
    level: str = ""

    @property
    def _features_dir(self) -> Path:
        if self.level:
            return self.root / "data" / "levels" / self.level
        return self.root / "data" / "features"

    @property
    def _codebook_dir(self) -> Path:
        if self.level:
            return self.root / "models" / "levels" / self.level
        return self.root / "models" / "codebook"

    # the fixed files and folders (a level's features and codebook under its own folders)
    prepared = _under("root", "data", "prepared", doc="Prepared dataset directory.")
    features = _under("_features_dir", "teacher_features.npy",
                      doc="Teacher spatial feature vectors (.npy, memory-mappable).")
    features_meta = _under("_features_dir", "teacher_features.json",
                           doc="Metadata of the extracted features.")
    teacher_model = _under("root", "models", "teacher", "teacher.pt",
                           doc="The teacher's model file.")
    codebook = _under("_codebook_dir", "codebook.npy",
                      doc="The visual-word vocabulary (K x C .npy).")
    codebook_meta = _under("_codebook_dir", "codebook.json", doc="Metadata of the codebook.")
    metrics = _under("root", "metrics", doc="Metrics directory (small JSON files DVC shows).")
    plots = _under("root", "plots", doc="Plots directory (CSV curves).")
    logs = _under("root", "logs", doc="Per-run log files.")
    reports = _under("root", "reports",
                     doc="The HTML and Markdown report of a finished run (quest report).")

    @property
    def codebook_metrics(self) -> Path:
        """The codebook's statistics (metrics/codebook.json; a level's beside its codebook)."""
        if self.level:
            return self._codebook_dir / "metrics.json"
        return self.metrics / "codebook.json"

    def codebook_plot(self, what: str) -> Path:
        """A codebook CSV for plots: `what` is objective or usage."""
        if self.level:
            return self._codebook_dir / f"codebook_{what}.csv"
        return self.plots / f"codebook_{what}.csv"

    def student_model(self, method: str) -> Path:
        """A trained student's model file (the plain architecture)."""
        return self.root / "models" / "students" / f"{method_slug(method)}.pt"

    def student_metrics(self, method: str) -> Path:
        """Per-epoch history and final numbers of one student."""
        return self.metrics / "students" / f"{method_slug(method)}.json"

    def student_curve(self, method: str) -> Path:
        """Per-epoch CSV of one student, for plots."""
        return self.root / "plots" / "students" / f"{method_slug(method)}.csv"

    def checkpoint(self, name: str) -> Path:
        """Resumable training checkpoint (kept outside DVC outs so repro does not delete it)."""
        return self.root / ".quest" / "checkpoints" / f"{method_slug(name)}.pt"

    @property
    def results(self) -> Path:
        """Provenance records of finished student runs, one JSON per run: everyday runs in
        results/runs/ (not committed), a study's runs in results/<study>/ (committed)."""
        return self.results_dir or self.root / "results" / RUNS_DIR

