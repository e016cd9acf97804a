"""One readable driver per method; each exposes run(ctx) -> summary dict."""
