"""What a run reads and writes besides training: metrics, the summary, exports, generation."""
