"""Embedded data: real user prompts and answers (ShareGPT) for benign traffic, prompts and controls."""

from distillguard.data.sharegpt import Conversation, iter_conversations

__all__ = ["Conversation", "iter_conversations"]
