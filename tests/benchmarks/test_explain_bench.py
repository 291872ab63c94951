"""The benchmark's explain variants compute the same maps (so it compares like with like)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.explain import ResearchStack, batch_rank_loop, batch_vmap, build_bench_model, per_image_loop


def test_variants_agree():
    model = build_bench_model("bcos_resnet8", 8, 32, 32, 4, 5)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    top_n = 3
    stack = ResearchStack(model)  # bcos package layers, same weights
    assert any(type(m).__module__.startswith("bcos.") for m in stack.model.modules())
    per_image = torch.cat(per_image_loop(stack, images, top_n)).view(3, top_n, 6, 32, 32)
    per_rank = torch.stack(batch_rank_loop(stack, images, top_n), dim=1)
    ours = model.explain(images, top_k=top_n, maps=True, map_kinds=("concepts",))
    concept_maps = ours.maps.concepts["layer3"]
    torch.testing.assert_close(per_rank, concept_maps, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(per_image, concept_maps, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(batch_vmap(stack, images, top_n).movedim(0, 1), concept_maps, rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # a timed benchmark run
def test_scale_bench_smoke_reports_every_figure_and_exact_explanations():
    from benchmarks import scale

    results = scale.main(["--smoke", "--models", "resnet_tiny", "--repeats", "1", "--threads", "1"])
    figures = results["resnet_tiny"]
    for key in ("forward_b1", "forward_b8", "forward_backbone_b1", "explain_no_maps_b1", "explain_maps_b8"):
        assert figures[key] > 0, key
    assert 0.3 < figures["peak_rss_gb"] < 8  # a real process's peak, in GB
    assert figures["completeness_relative"] < 1e-4
    assert set(figures["ratios"]) == {"explain_no_maps_b1", "explain_maps_b1", "explain_maps_b8", "concept_share"}
