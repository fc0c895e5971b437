"""`python -m drip_demo [--quick] [--fresh] [--out DIR]`: the whole pipeline (drip_demo.pipeline)."""
from drip_demo.pipeline import main

main()
