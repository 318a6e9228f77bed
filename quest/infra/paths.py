"""Where every stage reads and writes, relative to the project root."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Everyday runs record here (git-ignored); studies record under results/<study>/ (committed).
RUNS_DIR = "runs"


def method_slug(method: str) -> str:
    """File-name form of a method name (kept as is, so DVC foreach paths match)."""
    return method


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

    @property
    def prepared(self) -> Path:
        """Prepared dataset directory."""
        return self.root / "data" / "prepared"

    @property
    def features(self) -> Path:
        """Teacher spatial feature vectors (.npy, memory-mappable)."""
        return self._features_dir / "teacher_features.npy"

    @property
    def features_meta(self) -> Path:
        """Metadata of the extracted features."""
        return self._features_dir / "teacher_features.json"

    @property
    def teacher_model(self) -> Path:
        """The teacher's model file."""
        return self.root / "models" / "teacher" / "teacher.pt"

    @property
    def codebook(self) -> Path:
        """The visual-word vocabulary (K x C .npy)."""
        return self._codebook_dir / "codebook.npy"

    @property
    def codebook_meta(self) -> Path:
        """Metadata of the codebook."""
        return self._codebook_dir / "codebook.json"

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

    @property
    def metrics(self) -> Path:
        """Metrics directory (small JSON files DVC shows)."""
        return self.root / "metrics"

    def student_metrics(self, method: str) -> Path:
        """Per-epoch history and final numbers of one student."""
        return self.metrics / "students" / f"{method_slug(method)}.json"

    def student_curve(self, method: str) -> Path:
        """Per-epoch CSV of one student, for plots."""
        return self.root / "plots" / "students" / f"{method_slug(method)}.csv"

    @property
    def plots(self) -> Path:
        """Plots directory (CSV curves)."""
        return self.root / "plots"

    def checkpoint(self, name: str) -> Path:
        """Resumable training checkpoint (kept outside DVC outs so repro does not delete it)."""
        return self.root / ".quest" / "checkpoints" / f"{method_slug(name)}.pt"

    @property
    def results(self) -> Path:
        """Provenance records of finished student runs, one JSON per run: everyday runs in
        results/runs/ (not committed), a study's runs in results/<study>/ (committed)."""
        return self.results_dir or self.root / "results" / RUNS_DIR

    @property
    def logs(self) -> Path:
        """Per-run log files."""
        return self.root / "logs"

    @property
    def reports(self) -> Path:
        """The HTML and Markdown report of a finished run (quest report)."""
        return self.root / "reports"
