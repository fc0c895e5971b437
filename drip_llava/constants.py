"""Token conventions shared by the data, model and serving code (LLaVA's values, so LLaVA data works as is)."""

IGNORE_INDEX = -100  # label value ignored by the loss (image positions, prompts, padding)
IMAGE_TOKEN_INDEX = -200  # placeholder id in input_ids; the model splices image features there
DEFAULT_IMAGE_TOKEN = "<image>"  # marker in the LLaVA JSON conversations / prompts
