"""The OpenAI endpoints that know nothing of HTTP: chat and completions, their shared choice
fan-out, prompts from chat templates, tool calls, and the OpenAI request and response models."""
