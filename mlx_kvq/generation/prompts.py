"""Prompts as token ids."""


def encode_prompt(tokenizer, prompt, system_prompt=None, ignore_chat_template=False, **template_kwargs):
    """Prompt token ids, through the chat template when the tokenizer has one
    (``template_kwargs`` go to ``apply_chat_template``, as mlx-lm's ``--chat-template-config``)."""
    if ignore_chat_template or not getattr(tokenizer, "chat_template", None):
        return tokenizer.encode(prompt)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)
