"""Training data for the LLaVA stack: conversation templates, the LLaVA-JSON dataset and its collator."""
from .conversation import (
                           ConversationError,
                           ConversationTemplate,
                           Rendered,
                           TokenizationMismatch,
                           build_prompt,
                           get_template,
                           list_templates,
                           normalize_messages,
                           place_image,
                           register_template,
                           tokenize_conversation,
                           tokenizer_image_token,
)
from .dataset import (
                           BadSampleError,
                           DataCollatorForSupervisedDataset,
                           ImageLoader,
                           LazySupervisedDataset,
                           VisualTokenBudget,
                           compute_image_token_counts,
                           load_llava_json,
)

__all__ = [
    "BadSampleError", "ConversationError", "ConversationTemplate", "DataCollatorForSupervisedDataset", "ImageLoader",
    "LazySupervisedDataset", "Rendered", "TokenizationMismatch", "VisualTokenBudget", "build_prompt",
    "compute_image_token_counts", "get_template", "list_templates", "load_llava_json", "normalize_messages",
    "place_image", "register_template", "tokenize_conversation", "tokenizer_image_token",
]
