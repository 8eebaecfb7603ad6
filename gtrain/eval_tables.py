"""The `gtrain eval` report for a human: its JSON report as text tables, which the CLI lays out."""

from dataclasses import dataclass
from typing import Any

# Beyond this many classes a printed matrix no longer fits a terminal: list the most-confused pairs.
MAX_PRINTED_MATRIX_CLASSES = 20


@dataclass(frozen=True)
class TextTable:
    title: str
    columns: tuple[str, ...]
    rows: list[tuple[str, ...]]
    name_columns: int = 1  # the first columns hold names, the others numbers


def report_tables(report: dict[str, Any]) -> list[TextTable]:
    """The tables under the summary line of `gtrain eval`, from its JSON report."""
    tables = [per_class_table(report)]
    if report["worst_classes"]:
        tables.append(worst_classes_table(report))
    tables.append(confusion_table(report))
    if report.get("worst_images"):
        tables.append(worst_images_table(report))
    return tables


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction:.2%}"


def per_class_table(report: dict[str, Any]) -> TextTable:
    rows = [
        (row["class"], str(row["images"]), _percent(row["precision"]), _percent(row["recall"]), _percent(row["f1"]))
        for row in report["per_class"]
    ]
    return TextTable("per-class accuracy", ("class", "images", "precision", "recall (top-1)", "F1"), rows)


def worst_classes_table(report: dict[str, Any]) -> TextTable:
    rows = [
        (row["class"], row["mistaken_for"], str(row["images"]), _percent(row["recall"]), str(row["mistaken_images"]))
        for row in report["worst_classes"]
    ]
    columns = ("class", "mistaken most for", "images", "recall", "mistaken")
    return TextTable("worst classes (lowest recall)", columns, rows, name_columns=2)


def worst_images_table(report: dict[str, Any]) -> TextTable:
    rows = [(row["image"], row["class"], row["predicted"], _percent(row["probability"]), f"{row['loss']:.3f}")
            for row in report["worst_images"]]  # fmt: skip
    columns = ("image", "class", "predicted", "probability", "loss")
    return TextTable("worst images (highest loss; gtrain report shows them)", columns, rows, name_columns=3)


def confusion_table(report: dict[str, Any]) -> TextTable:
    names = [row["class"] for row in report["per_class"]]
    if len(names) > MAX_PRINTED_MATRIX_CLASSES:
        rows = [(pair["true"], pair["predicted"], str(pair["images"])) for pair in report["most_confused"]]
        return TextTable(f"most confused of {len(names)} classes", ("true class", "predicted", "images"), rows, 2)
    # Columns are numbered, not named, so that a matrix of up to 20 classes fits a terminal.
    rows = [(f"{t} {name}", *map(str, counts)) for t, (name, counts) in enumerate(zip(names, report["confusion_matrix"]))]
    columns = ("true \\ predicted", *map(str, range(len(names))))
    return TextTable("confusion matrix (rows: true class, columns: predicted)", columns, rows)
