"""Reports: the report file (build, write, read), its rendering, plots, TensorBoard, comparisons and
projections. Reads what training and timing produce; never imports training."""
