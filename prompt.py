"""BIGRec's prompt (Bao et al. 2023), shared by the teacher (teacher.py) and its fine-tuning
(finetune.py): the Alpaca instruction with the user's history as its input, split at the history
so that the part every row shares is computed once; and the fixed-seed row subsets both take."""
from __future__ import annotations

import numpy as np

ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further "
          "context. Write a response that appropriately completes the request. \n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
DOMAIN_WORDS = {"movies": ("movies", "movie", "watched"), "games": ("video games", "video game", "played")}
HISTORY = "\x00HISTORY\x00"  # placeholder splitting a prompt into a shared prefix and a per-row part


def prompt_template(domain: str, chat_template: str | None = None) -> tuple[str, str]:
    """BIGRec's Alpaca prompt for a domain, split at the history: (prefix, suffix).
    With chat_template (a Jinja template from the model), the same instruction and input are
    sent as one user message instead."""
    plural, singular, verb = DOMAIN_WORDS.get(domain, ("items", "item", "interacted with"))
    instruction = (f"Given a list of {plural} the user has {verb} before, please recommend a new "
                   f"{singular} that the user likes to the user.")
    inp = f"The user has {verb} the following {plural} before:{HISTORY}"
    if chat_template is None:
        text = ALPACA.format(instruction=instruction, input=inp)
    else:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        fmt = Jinja2ChatFormatter(chat_template, eos_token="", bos_token="", add_generation_prompt=True)
        text = fmt(messages=[{"role": "user", "content": f"{instruction}\n\n{inp}"}]).prompt
    prefix, _, suffix = text.partition(HISTORY)
    return prefix, suffix


def history_text(titles: list[str]) -> str:
    return ", ".join(f'"{t}"' for t in titles)


def select_rows(n_rows: int, count: int | None, seed: int) -> np.ndarray:
    """A fixed-seed random subset of count rows, sorted (all of them when count is None)."""
    if count is None or count >= n_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, count, replace=False))
