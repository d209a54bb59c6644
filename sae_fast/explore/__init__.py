"""Exploring an SAE's features (`sae-fast explore`, `sae-fast activations`).

    from sae_fast.explore import explore, write_dashboard
    res = explore(sae, model, tokenizer, texts_or_token_stream, tokens=20_000)   # ExploreResult
    paths = write_dashboard(res, "out")        # {"index_html", "stats_json", "out_dir"}
    res.summary(5)                             # a few features with their top tokens

explore() runs the model only up to the SAE's hook point and the SAE's sparse encoder (never a
dense [tokens, d_sae] tensor), and keeps the per-feature statistics and top-k contexts on the
device (FeatureStats, stats.py).
"""

from .activations import TokenFeatures, activations_html, format_activations, token_activations
from .dashboard import result_json, write_dashboard
from .run import (ExploreResult, explore, explore_dashboard, load_model_for, load_sae, logit_lens, model_candidates,
                  pack_texts)
from .stats import FeatureStats, hist_edges, slide_hist, value_cells

__all__ = [
    "ExploreResult", "FeatureStats", "TokenFeatures", "activations_html", "explore", "explore_dashboard",
    "format_activations", "hist_edges", "load_model_for", "load_sae", "logit_lens", "model_candidates", "pack_texts",
    "result_json", "slide_hist", "token_activations", "value_cells", "write_dashboard"
]
