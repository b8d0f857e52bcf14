"""Prompts as token ids."""


def encode_prompt(tokenizer, prompt, system_prompt=None, ignore_chat_template=False):
    """Prompt token ids, through the chat template when the tokenizer has one."""
    if ignore_chat_template or not getattr(tokenizer, "chat_template", None):
        return tokenizer.encode(prompt)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
