"""The CPU demo and its data world, kept out of the library: the shapes-world generator and its questions
(synthetic, synthetic_questions), the attribute probe, the embedded SmolLM2 LLM, the demo pipeline
(`python -m drip_demo`, pipeline.py) and its report, the tower comparison (`make compare`, compare.py) and the
ViT-vs-DRIP CLIP comparison.

Dependencies point one way: drip_demo uses drip_llava and vision_pretrain; nothing in them imports drip_demo.
"""
