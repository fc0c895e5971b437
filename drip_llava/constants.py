"""Token conventions shared by the data, model and serving code (LLaVA's values, so LLaVA data works as is)."""

IGNORE_INDEX = -100  # label value ignored by the loss (image positions, prompts, padding)
IMAGE_TOKEN_INDEX = -200  # placeholder id in input_ids; the model splices image features there
DEFAULT_IMAGE_TOKEN = "<image>"  # marker in the LLaVA JSON conversations / prompts
# LLaVA-1.5's answer-format instructions (its VQA / ScienceQA eval prompts and mix665k training questions)
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
MC_ANSWER_PROMPT = "Answer with the option's letter from the given choices directly."
