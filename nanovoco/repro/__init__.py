"""The experiments: the reproduction of the paper's tables in miniature (`python -m nanovoco.repro`, run.py) and
the programs it is made of or sits beside. Nothing in the library (nanovoco/*.py) imports from here.

- recipe.py, stats.py, analysis.py, report.py, run.py: the main job, by idea (stages as data, statistics, the
  per-seed summaries, tables and plots, the runner);
- synthetic.py, synthetic_video.py: the synthetic visual QA data (Sort-of-CLEVR scenes, moving shapes);
- vision_pretrain.py: the tiny ViT the reproduction pretrains as its CLIP; probe.py: what its features hold;
- scene_text.py: a text-only LLM answering the scenes written as text (the SmolLM2 run's zero-shot row);
- bench.py: the inference-efficiency report (the paper's Table 7); paper_eval.py: the paper's benchmarks on real
  checkpoints; demo.py: the pipeline end to end with random weights.
"""
