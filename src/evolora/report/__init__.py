"""What a run or a suite shows a reader.

    run.py      a run's report.html (R, metrics, plots) and its text summaries
    tables.py   docs/RESULTS.md from benchmark results files
    compare.py  finished runs side by side"""

from evolora.report.run import matrix_text, predictions_path, read_final_predictions, read_metrics, summary_text, write_report

__all__ = ["matrix_text", "predictions_path", "read_final_predictions", "read_metrics", "summary_text", "write_report"]
