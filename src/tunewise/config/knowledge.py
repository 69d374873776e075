"""What each hyperparameter does, in our own words: the text behind `tunewise explain`.

One entry per schema key (a test fails when a key has none, or an entry names no key). The one-line
summary is the field's docstring in ``schema.py``, so the two cannot drift apart.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table

from tunewise.config.problems import show, suggest
from tunewise.config.schema import SECTIONS, all_keys, field_doc


@dataclass(frozen=True)
class Knowledge:
    key: str
    section: str
    summary: str
    """One line: the schema field's docstring."""
    what: str
    """What it does, one paragraph."""
    hf_name: str
    """The Hugging Face argument it mirrors (`TrainingArguments.learning_rate`), or "tunewise"."""
    default_why: str
    """Our default and why."""
    typical_full: str = ""
    """Usual range when training every weight ("" where the method makes no difference)."""
    typical_lora: str = ""
    """Usual range with LoRA / QLoRA."""
    interactions: str = ""
    mistakes: str = ""


def _k(
    key: str,
    *,
    what: str,
    hf: str,
    why: str,
    full: str = "",
    lora: str = "",
    interactions: str = "",
    mistakes: str = "",
) -> Knowledge:
    section = all_keys().get(key, "")
    summary = field_doc(section, key) if section else ""
    return Knowledge(key, section, summary, what, hf, why, full, lora, interactions, mistakes)


_TA = "TrainingArguments."
_LC = "LoraConfig."
_BNB = "BitsAndBytesConfig."
_GC = "GenerationConfig."

_ENTRIES = [
    # ------------------------------------------------------------------------------------------ model
    _k(
        "model_name_or_path",
        what="The base model to fine-tune: a directory in Hugging Face format (config.json, safetensors, "
        "tokenizer), a single .gguf file whose weights are de-quantised into torch tensors, the small model "
        "embedded in tunewise, or a Hub id (downloaded once, then read from the cache).",
        hf="AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path)",
        why="smollm2-135m-instruct ships inside tunewise so a first run works offline on a laptop CPU in "
        "minutes; it is far too small for real tasks.",
        interactions="The model decides the chat template, the pretraining dtype (see precision) and the "
        "module names that target_modules can match.",
        mistakes="Fine-tuning a base (non-instruct) model with a chat template it never saw; expecting a "
        "4-bit GGUF to give back full-precision weights (its quantisation error stays after de-quantising).",
    ),
    _k(
        "torch_dtype",
        what="The dtype the base weights are held in while training. bfloat16 and float16 take 2 bytes per "
        "parameter, float32 takes 4. A frozen base (LoRA) loses nothing useful in bfloat16; weights that are "
        "trained (full) are safest in float32 with bf16/fp16 autocast, because small updates can round away "
        "in a 16-bit weight.",
        hf="from_pretrained(dtype=...) (named torch_dtype before transformers 4.56)",
        why="auto: bfloat16 for a LoRA/QLoRA base when training in bf16, float32 otherwise (fp32 master "
        "weights for full fine-tuning, and in fp32 runs: a CPU without AMX or AVX512_BF16).",
        interactions="precision (autocast dtype); bnb_4bit_compute_dtype for 4-bit bases.",
        mistakes="Loading float16 weights of a model pretrained in bfloat16: values past 65504 become inf.",
    ),
    _k(
        "attn_implementation",
        what="Which attention kernel transformers uses. sdpa calls PyTorch's "
        "scaled_dot_product_attention, which picks a fused flash or memory-efficient kernel when it can; "
        "eager is the plain matmul-softmax-matmul code (the only one that can return attention weights); "
        "flash_attention_2 needs the flash-attn package, an Ampere or newer NVIDIA GPU and fp16/bf16.",
        hf="from_pretrained(attn_implementation=...)",
        why="sdpa: fast and memory-lean everywhere PyTorch runs, with no extra package.",
        mistakes="Choosing flash_attention_2 on CPU, on an older GPU, or with fp32 weights.",
    ),
    _k(
        "trust_remote_code",
        what="Lets transformers import and run Python files shipped in the model repository, for "
        "architectures it does not include. That code runs with your permissions.",
        hf="from_pretrained(trust_remote_code=...)",
        why="false: most architectures are built into transformers; turn it on only for an author you trust.",
        mistakes="Enabling it for every model out of habit.",
    ),
    _k(
        "dropout",
        what="Overrides the model config's hidden dropout: on the residual stream and the embeddings, under "
        "whichever of these names the config has: dropout, hidden_dropout, hidden_dropout_prob, resid_pdrop, "
        "embd_pdrop, resid_dropout. Attention dropout has its own key, attention_dropout; dropout inside the MLP "
        "(activation_dropout, e.g. BioGPT's) and a classifier head's stay as the model has them. Dropout zeroes "
        "a random fraction p of activations in training and scales the rest by 1/(1-p), so eval sees the same "
        "expected values.",
        hf="tunewise (sets those model config fields)",
        why="null keeps the model's own value. Llama, Qwen, Mistral, Gemma and SmolLM configs have no hidden "
        "dropout at all (only attention_dropout), so there this key is an error; GPT-2, GPT-J, Phi, Falcon, "
        "GPT-NeoX, OPT and BLOOM have one.",
        full="0 to 0.1, where the model has the setting",
        interactions="With LoRA, lora_dropout is the usual regulariser instead.",
        mistakes="Adding dropout to a model pretrained without it and expecting less overfitting on a short "
        "run: it mostly adds noise.",
    ),
    _k(
        "attention_dropout",
        what="Dropout on the attention probabilities (after the softmax), as the model config's "
        "attention_dropout.",
        hf="LlamaConfig.attention_dropout (and the same field in other model configs)",
        why="null keeps the model's own value (0 for most modern LLMs).",
        full="0 to 0.1",
    ),
    # ------------------------------------------------------------------------------------------- data
    _k(
        "dataset",
        what="The training rows: one file or a list (JSONL, JSON, CSV, Parquet, or a folder written by "
        "datasets' save_to_disk), concatenated in order, or builtin:NAME for a dataset shipped with tunewise.",
        hf="tunewise (files read with datasets.load_dataset)",
        why="builtin:json_extract, a small extraction task that ships with tunewise, so the quickstart runs "
        "offline and has a task metric to show.",
        interactions="format (how rows become prompts and completions); validation_split.",
        mistakes="Mixing files of different formats in one list; training on a file that also holds the "
        "evaluation rows.",
    ),
    _k(
        "validation_file",
        what="Separate rows used only for evaluation: eval loss, perplexity, the task metric and sample "
        "answers. It cannot be combined with validation_split (an error); builtin: datasets bring their own "
        "validation rows, so they take neither.",
        hf="tunewise (as --validation_file in HF's run_clm.py example)",
        why="null: validation_split (if set) carves validation rows out of the training data instead.",
        interactions="eval_steps, early_stopping_patience, load_best_model_at_end all need validation data.",
        mistakes="Validating on rows that also appear (or nearly appear) in training data: the metric "
        "measures memory, not generalisation.",
    ),
    _k(
        "validation_split",
        what="Holds out part of the training data for evaluation: a fraction in (0, 1) or a number of rows, "
        "chosen at random with data_seed, so the split is reproducible.",
        hf="tunewise (like datasets' train_test_split(test_size=...))",
        why="null: no validation unless validation_file is given or the dataset is a builtin: one (which brings its "
        "own rows); small datasets cannot always spare rows.",
        full="0.05 to 0.1, or 100 to 1000 rows",
        lora="0.05 to 0.1, or 100 to 1000 rows",
        interactions="data_seed decides which rows; an error with validation_file or a builtin: dataset (two sources "
        "of validation rows).",
        mistakes="Holding out so few rows that the metric is noise (under ~50), or so many that training "
        "data runs short.",
    ),
    _k(
        "format",
        what="How a row becomes a conversation. text: raw text, loss on every token; prompt_completion: "
        "prompt and completion columns; alpaca: instruction / input / output columns; chat: a messages list "
        "of role/content turns. auto detects the format from the column names.",
        hf="tunewise (TRL's dataset formats plus Alpaca)",
        why="auto: the columns say which format a file is in; set it only to override a wrong guess.",
        interactions="train_on_inputs (text has no prompt to mask); chat_template; system_prompt.",
        mistakes="Rows with extra columns that make auto detection ambiguous.",
    ),
    _k(
        "system_prompt",
        what="A system message put before every conversation, in training and in generation, so the model "
        "learns the behaviour under the same instruction it will later be served with.",
        hf="tunewise (a system message in the chat template)",
        why="null: no system message unless the data has one.",
        interactions="chat_template (some templates have no system role).",
        mistakes="Training with one system prompt and serving with another (or none).",
    ),
    _k(
        "chat_template",
        what="A Jinja template that turns a list of messages into the exact token text the model sees, "
        "replacing the tokenizer's own template; or a name: chatml, llama3 or zephyr.",
        hf="PreTrainedTokenizerBase.chat_template",
        why="null: use the tokenizer's template, which matches how the instruct model was trained.",
        interactions="The adapter must be served with the same template it was trained with: the run directory's "
        "tokenizer carries it (tokenizer_config / chat_template.jinja), so `merge`, `generate` and other tools "
        "that call apply_chat_template use it. An error with plain text (format text), as system_prompt is: "
        "text rows are tokenised as they are.",
        mistakes="Base models have no template; inventing one is fine, but use it again at inference.",
    ),
    _k(
        "max_seq_length",
        what="The longest tokenised example, in tokens; longer ones are cut at truncation_side. Activation "
        "memory grows with batch size x length, and attention compute with length squared, so this is the "
        "second biggest memory dial after the model itself.",
        hf="trl.SFTConfig.max_length (max_seq_length in older TRL)",
        why="512 covers most instruction/answer pairs for small models while keeping memory low.",
        full="512 to 4096 (fit the data's longest examples)",
        lora="512 to 4096 (fit the data's longest examples)",
        interactions="per_device_train_batch_size (memory), truncation_side; with packing each example is "
        "still cut at this length.",
        mistakes="Cutting off the answers (right truncation removes the completion, which is what the loss "
        "is computed on); going past the model's max_position_embeddings. A multiple of 8 helps GPU tensor "
        "cores; odd sizes do not help anything.",
    ),
    _k(
        "truncation_side",
        what="Which end of an over-long example is removed: right cuts the end (the answer), left cuts the "
        "start (system prompt and early turns).",
        hf="PreTrainedTokenizerBase.truncation_side",
        why="right, as the tokenizer default; check how many examples are truncated at all (the plan shows it).",
        interactions="max_seq_length.",
        mistakes="Right truncation of long prompts leaves examples with no completion tokens to learn from.",
    ),
    _k(
        "padding",
        what="longest pads each batch to its longest example (dynamic padding, least wasted compute); "
        "max_length always pads to max_seq_length, so every batch has the same shape and peak memory is "
        "reached on the first step.",
        hf="PreTrainedTokenizerBase.__call__(padding=...)",
        why="longest: no compute spent on pad tokens; the memory check uses the worst case anyway.",
        interactions="pad_to_multiple_of; packing (packed rows need no padding).",
        mistakes="max_length with short data: most of each batch is padding.",
    ),
    _k(
        "padding_side",
        what="Where pad tokens go in training batches. Right padding is the norm for training a causal LM "
        "with an attention mask; batched generation always pads on the left, so new tokens follow the prompt "
        "directly.",
        hf="PreTrainedTokenizerBase.padding_side",
        why="right: the standard for training; generation handles its own side.",
        mistakes="Left-padding training batches without position ids that skip the pads.",
    ),
    _k(
        "pad_to_multiple_of",
        what="Rounds each padded length (each packed row) up to a multiple of this number. NVIDIA tensor "
        "cores run fp16/bf16 matmuls fastest when dimensions are multiples of 8. On a CPU, bf16 matmuls run "
        "through oneDNN, which compiles a kernel for every new matrix shape; with batch shapes that change "
        "every step that is paid every step, and rounding lets a few shapes recur.",
        hf="DataCollatorWithPadding.pad_to_multiple_of",
        why="null: no rounding; on a GPU, 8 is a cheap speed-up with dynamic padding. bf16 training on CPU "
        "sets 64 unless you set it (+8% tokens/s over 96 packed micro-batches, docs/performance.md); 1 or "
        "null turns that off.",
        interactions="padding: longest; packing; precision and device type (fp32 on CPU: no effect).",
        mistakes="Setting it for fp32 on CPU (MKL has no per-shape cost: it only adds pad tokens); large "
        "values with short examples.",
    ),
    _k(
        "packing",
        what="Flattens each micro-batch's examples into one row with no pad tokens; position ids restart at "
        "every example and no token attends across an example boundary, so the loss and gradients equal the "
        "padded batch's while no compute goes to padding. A batch is still N examples, so steps per epoch, "
        "effective batch and learning-rate schedules keep their HF meaning.",
        hf="trl.SFTConfig.packing / padding_free (ours keeps batch = examples, like padding_free)",
        why="false in the schema for the plainest batches; the quickstart turns it on because it is faster "
        "(1.7x padded batches on CPU; 3.2x a padded HF + PEFT loop on an H100, docs/performance.md). The plan "
        "suggests it when a quarter or more of the "
        "batch tokens would be padding.",
        interactions="padding and padding_side no longer matter; group_by_length still regroups which examples "
        "form each step (HF's order), which changes the batches and the loss curve but saves nothing, as there "
        "is no padding; pad_to_multiple_of rounds the packed row. With attn_implementation sdpa, attention runs "
        "per example (tunewise_varlen_sdpa; on GPUs "
        "torch's flash varlen kernel, on CPU tunewise's own kernel), costing the sum of squared example lengths, "
        "not the square of the row length. A model whose packed examples would still see each other (measured when "
        "the run is prepared: Bloom, MPT, OPT under eager) is refused.",
        mistakes="Expecting TRL's fixed-length packing, which changes the number of rows and so the step count; "
        "ours does not.",
    ),
    _k(
        "group_by_length",
        what="Draws batches of examples with similar lengths, so less of each batch is padding, as HF's "
        "LengthGroupedSampler: the shuffled examples are cut into mega-batches of up to 50 optimizer steps' "
        "worth (fewer on small data, to keep about four), each sorted longest first, with the longest example "
        "moved to the first step so an out-of-memory error shows at once.",
        hf=_TA + 'train_sampling_strategy: "group_by_length" (transformers 5; group_by_length before)',
        why="false: random batches give a smoother loss curve; turn it on when lengths vary a lot.",
        interactions="saves padding only with padding: longest. With padding: max_length or packing there is no "
        "padding to save, yet it still regroups which examples form each step (HF's LengthGroupedSampler "
        "order), so the batches and the loss curve change: leave it off there.",
        mistakes="Reading a saw-toothed loss curve as instability: it comes from length-sorted batches.",
    ),
    _k(
        "train_on_inputs",
        what="When false, the loss covers only the completion (or assistant turns); prompt tokens are "
        "masked with label -100. When true, the model also learns to predict the prompts.",
        hf="tunewise (axolotl's name; TRL's completion_only_loss / assistant_only_loss say the opposite)",
        why="false: the standard for instruction tuning; learning to write user questions rarely helps.",
        interactions="format: text has no prompt, so every token is trained either way.",
        mistakes="Turning it on for short answers after long prompts: the loss is dominated by prompt tokens.",
    ),
    _k(
        "bad_rows",
        what="What happens to a row that cannot be read (missing column, wrong type, empty completion): "
        "error stops with the file and line; skip drops it and reports how many were dropped.",
        hf="tunewise",
        why="error: a silent skip can drop most of a dataset without anyone noticing.",
        mistakes="skip on a file with a systematic problem (every row skipped for the same reason).",
    ),
    # ---------------------------------------------------------------------------------------- adapter
    _k(
        "method",
        what="full trains every weight: about 16 bytes per parameter (fp32 weights, gradients and the two "
        "AdamW moments) before activations. lora freezes the base and trains small low-rank matrices beside "
        "chosen layers. qlora is lora on a base loaded in 4 bit (about 0.5 byte per parameter).",
        hf="tunewise (full: no PEFT; lora/qlora: peft.get_peft_model)",
        why="lora: most of full fine-tuning's quality for a fraction of the memory, and it trains on a CPU.",
        interactions="learning_rate (auto picks a different default per method); quantization keys.",
        mistakes="Full fine-tuning with a LoRA learning rate; expecting qlora to be faster than lora: it saves memory, and dequantising the base each step costs time (on a CPU too, where bitsandbytes 4-bit runs).",
    ),
    _k(
        "r",
        what="The rank of each LoRA update: a d x k weight gets trainable matrices B (d x r) and A (r x k), "
        "r x (d + k) parameters, and its update is B·A scaled by lora_alpha / r.",
        hf=_LC + "r",
        why="16: enough capacity for most instruction tuning; higher ranks rarely help unless the task is "
        "far from pretraining.",
        lora="8 to 64",
        interactions="lora_alpha / r scales the update like a learning rate; raising r at fixed alpha makes "
        "each step smaller (use_rslora changes that to alpha / √r).",
        mistakes="Raising r to fix quality when the learning rate or the data is the problem; raising r "
        "without raising lora_alpha.",
    ),
    _k(
        "lora_alpha",
        what="The LoRA scaling numerator: the update B·A is multiplied by lora_alpha / r (lora_alpha / √r "
        "with rsLoRA). The factor scales the update like a learning rate, so doubling lora_alpha acts much "
        "like doubling the adapters' learning rate.",
        hf=_LC + "lora_alpha",
        why="32 (2 x r): a common choice; PEFT's own default is alpha 8 with r 8 (ratio 1).",
        lora="r to 2 x r (alpha / r between 1 and 2); a ratio outside 0.5-4 is unusual",
        interactions="r, use_rslora, learning_rate.",
        mistakes="Changing r or alpha between runs and comparing learning rates as if they meant the same.",
    ),
    _k(
        "lora_dropout",
        what="Dropout applied to the input of each LoRA branch (before A) during training; the frozen path "
        "is untouched. On CPU tunewise draws the masks about 5x cheaper than nn.Dropout (16-bit uniforms), so the "
        "probability used is this one rounded to 1/65536 (0.05 -> 0.0500031), with exact rescaling. At 0 "
        "(and fp32) each adapted linear trains as one matmul with W + s B A instead of the frozen matmul "
        "plus two thin adapter matmuls: 14-23% more tokens/s on CPU (docs/performance.md).",
        hf=_LC + "lora_dropout",
        why="0: PEFT's own default (also LLaMA-Factory's and Unsloth's), and the fast path: with dropout the "
        "adapter's input is no longer the frozen layer's, so the merged matmul cannot apply. 0.05-0.1 adds "
        "light regularisation (the QLoRA paper's values: 0.1 up to 13B, 0.05 above).",
        lora="0 to 0.1",
        mistakes="High dropout on a small dataset expecting it to stop overfitting; fewer epochs work better.",
    ),
    _k(
        "target_modules",
        what="Which layers get adapters. all-linear adds them to every linear layer except the output "
        "head; a list of names matches modules whose name ends with one of them (q_proj matches "
        "model.layers.0.self_attn.q_proj), and so does a single plain name (q_proj: PEFT alone would read it "
        "as a regular expression and match nothing); a string with regex characters must match the whole "
        "module name (.*\\.(q|v)_proj). A target that matches nothing is an error listing the linear layers.",
        hf=_LC + "target_modules",
        why="all-linear: the QLoRA paper found adapters on every linear layer were needed to match full "
        "fine-tuning; attention-only adapters (q_proj, v_proj, the original LoRA paper's choice) learn less.",
        lora="all-linear, or the attention and MLP projections by name",
        interactions="r (parameters grow with every targeted layer); model architecture (names differ: "
        "GPT-2 uses c_attn).",
        mistakes="Module names copied from another architecture match nothing.",
    ),
    _k(
        "bias",
        what="Which biases train with the adapters: none, all, or only those of adapted layers (lora_only).",
        hf=_LC + "bias",
        why="none: most modern LLMs have few or no biases, and trained biases stay changed even with the "
        "adapter disabled.",
        mistakes="bias other than none, then expecting 'disable adapter' to give back the base model.",
    ),
    _k(
        "use_rslora",
        what="Rank-stabilised LoRA (Kalajdzievski, 2023): scales the update by lora_alpha / √r instead of "
        "lora_alpha / r, so learning does not slow down as the rank grows.",
        hf=_LC + "use_rslora",
        why="false: the classic scaling, which most published settings assume.",
        interactions="With rsLoRA, keep lora_alpha roughly fixed as r changes; the alpha/r lint is skipped.",
        mistakes="Turning it on with alpha = 2 x r at high rank: the update becomes much larger "
        "(alpha / √r vs alpha / r).",
    ),
    _k(
        "use_dora",
        what="Weight-decomposed LoRA (Liu et al., 2024): splits each weight into a magnitude vector and a "
        "direction; LoRA updates the direction and the magnitude is trained separately. Often better at low "
        "rank; slower per step than LoRA.",
        hf=_LC + "use_dora",
        why="false: plain LoRA is faster and the usual baseline.",
        interactions="With a 4/8-bit base (QDoRA) it needs peft >= 0.10.",
        mistakes="Expecting LoRA's speed; serving it unmerged (merge for inference).",
    ),
    _k(
        "modules_to_save",
        what="Extra modules trained in full and saved with the adapter, e.g. embed_tokens and lm_head when "
        "new tokens were added (their embeddings start untrained).",
        hf=_LC + "modules_to_save",
        why="null: nothing beyond the adapters.",
        interactions="Adapter size: a full embedding matrix is vocab x hidden parameters.",
        mistakes="Adding tokens without training the embeddings; saving lm_head without need (large files).",
    ),
    _k(
        "init_lora_weights",
        what="How LoRA matrices start. true: A random (Kaiming-uniform), B zero, so the adapter is a no-op "
        "at step 0; gaussian: A Gaussian, B zero; nora: A random with unit-norm columns, B zero; pissa / olora: "
        "the base weights' principal directions (SVD / QR), subtracted from the base; mica: B from the base "
        "weight's smallest singular vectors, A zero, B frozen; orthogonal: random orthogonal A and B with "
        "B A = 0, base untouched (r even); false: both random (debugging only). Refused before loading: eva and corda (a data pass "
        "PEFT leaves to the caller), astra (a calibration pass too), loftq (needs a LoftQConfig), pissa_niter_N (PEFT redoes its randomised "
        "SVD on load, so the saved adapter would not be the trained model; docs/adapters.md).",
        hf=_LC + "init_lora_weights",
        why="true: PEFT's default; training starts exactly at the base model.",
        mistakes="false in a real run: the model changes before any training.",
    ),
    # ----------------------------------------------------------------------------------- quantization
    _k(
        "load_in_4bit",
        what="Stores the base weights in 4 bit through bitsandbytes and de-quantises them per matmul to "
        "bnb_4bit_compute_dtype; about 0.5 byte per parameter instead of 2.",
        hf=_BNB + "load_in_4bit",
        why="auto: on exactly when method is qlora.",
        interactions="method (qlora needs it, full cannot use it); bnb_4bit_* keys.",
        mistakes="Full fine-tuning on a 4-bit base (quantised weights cannot be trained); merging an adapter "
        "into the 4-bit weights instead of into the 16-bit base.",
    ),
    _k(
        "load_in_8bit",
        what="Stores the base weights in 8 bit with bitsandbytes' LLM.int8() (Dettmers et al., 2022), which "
        "keeps outlier features in 16 bit.",
        hf=_BNB + "load_in_8bit",
        why="false: 4 bit (qlora) saves more memory; 8 bit is usually slower than 16-bit training.",
        interactions="method: lora (not full, not qlora); conflicts with load_in_4bit.",
        mistakes="Expecting it to be faster: it trades speed for memory.",
    ),
    _k(
        "bnb_4bit_quant_type",
        what="The 4-bit data type: nf4 (NormalFloat4, whose levels fit normally distributed weights; the "
        "QLoRA paper found it better than fp4) or fp4.",
        hf=_BNB + "bnb_4bit_quant_type",
        why="nf4: QLoRA's choice and the better one for LLM weights.",
        interactions="Only used when the base is loaded in 4 bit.",
    ),
    _k(
        "bnb_4bit_use_double_quant",
        what="Quantises the per-block scaling constants too (QLoRA's double quantisation), saving about "
        "0.37 bit per parameter (about 3 GB on a 65B model) at no measurable quality cost.",
        hf=_BNB + "bnb_4bit_use_double_quant",
        why="true: free memory.",
        interactions="Only used when the base is loaded in 4 bit.",
    ),
    _k(
        "bnb_4bit_compute_dtype",
        what="The dtype 4-bit weights are de-quantised to for each matmul.",
        hf=_BNB + "bnb_4bit_compute_dtype",
        why="auto: follows the training precision (bfloat16 when training in bf16). BitsAndBytesConfig's own "
        "default is float32, which is much slower in a bf16 or fp16 run.",
        interactions="precision.",
        mistakes="float32 compute with a bf16/fp16 run: slow matmuls for no gain.",
    ),
    # --------------------------------------------------------------------------------------- training
    _k(
        "output_dir",
        what="Where a run writes its resolved config, metrics, checkpoints, adapter or model with its "
        "tokenizer, model card and summary.",
        hf=_TA + "output_dir",
        why="runs/<the config file's name> (runs/exp1 for exp1.yaml), so each experiment's config writes its own "
        "run directory and `--resume` finds it; runs/quickstart without a file (the defaults, a dict in Python). "
        "An earlier run already there is moved to earlier-runs/<UTC time>/ first, whole (its checkpoints, "
        "metrics, card, final adapter or model with config.json and tokenizer), never overwritten; files "
        "tunewise never writes stay.",
        mistakes="Reusing a directory for a different experiment: checkpoints and metrics mix.",
    ),
    _k(
        "num_train_epochs",
        what="How many passes over the training data; fractions stop part-way through the last pass. Total "
        "optimizer steps ≈ epochs x rows / effective batch.",
        hf=_TA + "num_train_epochs",
        why="3, HF's default: enough for a small instruction dataset to take effect.",
        full="1 to 3",
        lora="1 to 5 (small datasets need more passes, but watch eval loss for overfitting)",
        interactions="max_steps > 0 overrides it.",
        mistakes="Many epochs on a small dataset: training loss falls while eval loss rises.",
    ),
    _k(
        "max_steps",
        what="The total number of optimizer updates. max_steps > 0 overrides num_train_epochs, as in HF; "
        "-1 trains for num_train_epochs. 0 is refused: transformers would record 0 steps yet run one update "
        "(at learning rate 0 under the linear schedule) before stopping.",
        hf=_TA + "max_steps",
        why="-1: length comes from epochs, which scales with the dataset.",
        interactions="num_train_epochs (ignored when > 0); warmup_ratio and fractional steps are fractions "
        "of this total.",
        mistakes="Setting both and expecting epochs to cap it.",
    ),
    _k(
        "per_device_train_batch_size",
        what="Sequences in each forward/backward pass on one device (a micro-batch). The effective batch = "
        "per-device x accumulation x devices; activation memory grows with batch size x sequence length.",
        hf=_TA + "per_device_train_batch_size",
        why="8, HF's default; auto derives it from effective_batch_size (16 when unset).",
        full="1 to 16, accumulated to an effective batch of 32 to 128",
        lora="1 to 16, accumulated to an effective batch of 8 to 64",
        interactions="gradient_accumulation_steps, effective_batch_size, max_seq_length, "
        "gradient_checkpointing; with packing, max_tokens_per_micro_batch bounds a micro-batch by tokens "
        "instead (the plan prints the largest micro-batch's tokens). On GPU, sizes in multiples of 8 help tensor cores; odd sizes do not help "
        "anything.",
        mistakes="Raising it until memory runs out and forgetting that the learning rate was tuned for "
        "the old effective batch.",
    ),
    _k(
        "max_tokens_per_micro_batch",
        what="With packing, bounds each micro-batch by tokens instead of examples: the examples drawn for a "
        "step are re-cut, longest first, into packed rows of at most this many tokens (first-fit decreasing), "
        "so the step, its gradient and the loss curve are unchanged and only the number of micro-batches "
        "varies. Activation memory follows a micro-batch's tokens, so this bounds it whatever the lengths "
        "drawn, where per_device_train_batch_size alone allows per-device x max_seq_length tokens.",
        hf="tunewise (HF batches count sequences; TRL's packing fills rows of max_length but changes the steps)",
        why="null (off): micro-batches hold per_device_train_batch_size examples. On CPU, SmolLM2 LoRA in fp32, "
        "rows of at most 512 tokens peaked 14% lower than micro-batches of 2 examples (1.65 against 1.91-1.93 "
        "GiB) at the same speed within noise (docs/performance.md, item 14).",
        full="a few times max_seq_length; as large as memory allows",
        lora="a few times max_seq_length; as large as memory allows",
        interactions="Needs data.packing and at least data.max_seq_length; per_device_train_batch_size x "
        "gradient_accumulation_steps still sets the examples per step; the pads that round a row up to "
        "pad_to_multiple_of count (so a multiple of it wastes nothing).",
        mistakes="Setting it small to save memory on a fast device: smaller micro-batches run their matmuls "
        "less efficiently and add a pass over the adapters' weights each.",
    ),
    _k(
        "per_device_eval_batch_size",
        what="Sequences per evaluation batch on one device.",
        hf=_TA + "per_device_eval_batch_size",
        why="16: evaluation keeps no gradients or optimizer state, so it fits larger batches (HF uses 8).",
        interactions="max_seq_length; peak memory of evaluation runs.",
    ),
    _k(
        "gradient_accumulation_steps",
        what="Micro-batches whose gradients are summed before one optimizer update; it gives the update of "
        "a bigger batch without its memory. Effective batch = per-device x accumulation x devices.",
        hf=_TA + "gradient_accumulation_steps",
        why="1, HF's default; auto derives it from effective_batch_size.",
        interactions="Each optimizer step takes this many forward/backward passes; steps per epoch shrink "
        "by the same factor.",
        mistakes="Counting logging/eval/save steps in micro-batches: they count optimizer updates.",
    ),
    _k(
        "effective_batch_size",
        what="The number of sequences per optimizer update you want (per-device x accumulation x devices); "
        "when a batch key is auto, tunewise picks the largest per-device batch (up to 4 on CPU, where 4 "
        "trained as fast as 8 with 60-70% of the memory, and 16 on a GPU) that divides it and accumulates "
        "the rest. When you set the other batch key to a number, that number is kept and the auto one is "
        "this over it (and the devices); a value it does not divide is an error.",
        hf="tunewise",
        why="null: an auto batch then targets 16 sequences per update, a middle-of-the-road value for "
        "fine-tuning; set it to choose another.",
        full="32 to 128",
        lora="8 to 64",
        interactions="Only used when per_device_train_batch_size or gradient_accumulation_steps is auto.",
        mistakes="Setting it while both batch keys are numbers: it is ignored.",
    ),
    _k(
        "gradient_checkpointing",
        what="Keeps only each layer's inputs during the forward pass and recomputes the rest in the "
        "backward pass: activation memory drops sharply, at the cost of about one extra forward pass "
        "(20 to 35% slower).",
        hf=_TA + "gradient_checkpointing",
        why="false: speed first; turn it on when long sequences or large batches do not fit.",
        interactions="per_device_train_batch_size and max_seq_length (what it lets you raise).",
    ),
    _k(
        "memory_check",
        what="Right after the first optimizer step, runs the forward and backward of the run's largest "
        "micro-batch (the most tokens, padding included, as the loop will cut it) once more, without an "
        "update: its gradients are discarded and the random state put back, so the run continues exactly as "
        "without it. With packing, token budgets or random order the largest micro-batch can come hours in; "
        "if it does not fit, this fails in the first minute instead, saving step 1 and saying what to change. "
        "Skipped when the first step already held a micro-batch as large.",
        hf="tunewise (HF's auto_find_batch_size halves the batch after an out-of-memory instead, changing the "
        "run's batches)",
        why="auto: enabled on GPUs (one extra micro-batch per run), not on CPU, where running out of memory is "
        "usually the kernel's OOM killer ending the process rather than an error. Whether on or off, an "
        "out-of-memory error in any step saves the last finished step before it stops.",
        interactions="max_tokens_per_micro_batch, per_device_train_batch_size, gradient_checkpointing (the "
        "fixes the message suggests; a resume accepts the first and the last).",
        mistakes="Reading a passed check as a guarantee: memory fragmentation or evaluation batches "
        "(per_device_eval_batch_size) can still run out later.",
    ),
    _k(
        "torch_compile",
        what="Compiles each decoder layer with torch.compile (inductor, dynamic shapes, so varying sequence "
        "lengths reuse one graph): norms, activations, rotary embeddings and residual adds run as fused "
        "kernels, and cheap intermediates are recomputed in the backward pass instead of stored (on CPU "
        "with an activation memory budget of 0.8, which kept a SmolLM2 LoRA step's speed for 0.3-0.4 GiB "
        "less RSS). The first step pays the compile (about a minute on 2 CPU cores); later steps are faster.",
        hf=_TA + "torch_compile",
        why="false, as in HF: compiling costs start-up time and needs a C++ compiler on CPU. Measured on "
        "SmolLM2-135M LoRA, 2 CPU cores: docs/performance.md.",
        interactions="data.packing (on CPU its per-example attention is an opaque custom op, so each layer "
        "still compiles to one graph; with attention dropout it falls back to a graph break per layer); "
        "gradient_checkpointing.",
        mistakes="Timing a short run that includes the compile; turning it on for a run of a few steps.",
    ),
    _k(
        "learning_rate",
        what="The peak step size of the optimizer, reached after warmup and then shaped by the scheduler. "
        "The most important dial: too high diverges or erases pretrained knowledge, too low barely moves.",
        hf=_TA + "learning_rate",
        why="auto: 2e-4 for LoRA/QLoRA (the QLoRA paper's rate for 7B-13B models) and 2e-5 for full "
        "fine-tuning (the Alpaca recipe); HF's own default is 5e-5.",
        full="1e-5 to 5e-5 (up to 1e-4 for small models)",
        lora="1e-4 to 5e-4 (up to 1e-3 for small models or low alpha/r)",
        interactions="lora_alpha / r multiplies the adapters' effective rate; larger effective batches "
        "tolerate larger rates; warmup; lr_scheduler_type.",
        mistakes="A LoRA rate (2e-4) for full fine-tuning; a full fine-tuning rate (1e-5) for LoRA.",
    ),
    _k(
        "lr_scheduler_type",
        what="The shape of the learning rate after warmup: linear decays to 0; cosine follows half a cosine "
        "to 0; cosine_with_restarts repeats it num_cycles times (lr_scheduler_kwargs; its default, 1, is plain "
        "cosine); cosine_with_min_lr stops at a floor; polynomial decays to "
        "lr_end; constant keeps the rate and, in transformers, ignores warmup; constant_with_warmup warms up "
        "then stays flat.",
        hf=_TA + "lr_scheduler_type",
        why="linear, HF's default; cosine is an equally good common choice.",
        interactions="lr_scheduler_kwargs; warmup (refused with constant, which has none).",
        mistakes="constant with warmup: transformers silently skips the warmup (tunewise refuses it); use "
        "constant_with_warmup.",
    ),
    _k(
        "lr_scheduler_kwargs",
        what="Extra arguments of the chosen schedule: num_cycles (cosine, cosine_with_restarts), min_lr or "
        "min_lr_rate (cosine_with_min_lr, exactly one), lr_end and power (polynomial).",
        hf=_TA + "lr_scheduler_kwargs",
        why="empty: each schedule's defaults (cosine: half a cycle; cosine_with_restarts: one cycle, no restart).",
        interactions="lr_scheduler_type decides which names apply.",
        mistakes="cosine_with_min_lr without min_lr or min_lr_rate (transformers refuses it).",
    ),
    _k(
        "warmup_ratio",
        what="Warmup as a fraction of total optimizer steps: warmup steps = ceil(ratio x total steps), "
        "during which the rate rises linearly from 0 to learning_rate, taming Adam's noisy first updates.",
        hf=_TA + "warmup_ratio (transformers < 5; in 5.x a float warmup_steps below 1)",
        why="unset (with warmup_steps unset): 3% of total steps (rounded up, as HF; always fewer than the run's, so a "
        "1-step run does not spend its one update at rate 0), the Alpaca/QLoRA recipes' value.",
        full="0.03 to 0.1",
        lora="0.03 to 0.1",
        interactions="warmup_steps wins when both are set (as in HF); max_steps / epochs set the total.",
        mistakes="Warmup longer than ~20% of a short run: little training happens at the full rate.",
    ),
    _k(
        "warmup_steps",
        what="Warmup length in optimizer steps, during which the rate rises linearly from 0 to learning_rate. "
        "A value below 1 is a fraction of the total steps, as in transformers 5 (which dropped warmup_ratio): "
        "0.05 means ceil(5% of the steps). From 1 up it must be a whole number (transformers would truncate "
        "2.5 to 2). Wins over warmup_ratio when both are set, as in HF.",
        hf=_TA + "warmup_steps (a float in transformers 5)",
        why="unset: warmup comes from warmup_ratio (or the 3% default).",
        full="a few % of total steps",
        lora="a few % of total steps",
        interactions="warmup_ratio (overridden); lr_scheduler_type constant has no warmup, so tunewise refuses "
        "any warmup with it (transformers would skip it silently): use constant_with_warmup.",
        mistakes="A fixed step count copied from a longer run: it can exceed the whole run.",
    ),
    _k(
        "weight_decay",
        what="AdamW's decoupled weight decay (Loshchilov & Hutter): each step shrinks weights by "
        "lr x weight_decay x weight, separately from the gradient update, instead of adding an L2 term to "
        "the gradient (which Adam's scaling would distort). Biases and norm weights are not decayed. It "
        "regularises; it does NOT save memory. With optim: sgd it is torch SGD's classic L2 term, added to "
        "the gradient.",
        hf=_TA + "weight_decay",
        why="0.0, HF's default: short fine-tunes rarely need it.",
        full="0 to 0.1",
        lora="0 to 0.01",
        interactions="learning_rate (the decay per step is lr x weight_decay).",
        mistakes="Expecting it to reduce memory; large decay on LoRA pulls adapters back towards the base.",
    ),
    _k(
        "optim",
        what="The optimizer, by HF's name. adamw_torch / adamw_torch_fused: PyTorch AdamW, two fp32 moments "
        "per trained parameter (8 bytes); adamw_8bit / adamw_bnb_8bit: bitsandbytes 8-bit moments (2 bytes); "
        "paged_*: moments that page to CPU memory on spikes (QLoRA's choice); adafactor: factored second "
        "moments, little memory; sgd: plain SGD, no optimizer state.",
        hf=_TA + "optim",
        why="adamw_torch: the reference optimizer, runs everywhere.",
        interactions="Optimizer memory matters mostly for full fine-tuning; adapters are small.",
        mistakes="Expecting paged_* to page on CPU: paging needs CUDA unified memory, so elsewhere tunewise runs "
        "the unpaged optimizer and says so. 8-bit AdamW runs on CPU with bitsandbytes 0.49 or newer (older: "
        "adamw_torch, with a note).",
    ),
    _k(
        "adam_beta1",
        what="Decay of AdamW's first moment (the running mean of gradients).",
        hf=_TA + "adam_beta1",
        why="0.9, HF's and PyTorch's default.",
        full="0.9",
        lora="0.9",
    ),
    _k(
        "adam_beta2",
        what="Decay of AdamW's second moment (the running mean of squared gradients); lower values react "
        "faster to gradient spikes.",
        hf=_TA + "adam_beta2",
        why="0.999, HF's default; 0.95 is common in LLM pretraining for stability.",
        full="0.95 to 0.999",
        lora="0.95 to 0.999",
    ),
    _k(
        "adam_epsilon",
        what="Added to AdamW's denominator to avoid dividing by ~0.",
        hf=_TA + "adam_epsilon",
        why="1e-8, HF's default.",
        mistakes="Tuning it before the learning rate.",
    ),
    _k(
        "max_grad_norm",
        what="Rescales the gradients when their global L2 norm exceeds this value, limiting the damage of a "
        "bad batch; 0 or null disables it. With fp16 the gradients are unscaled first.",
        hf=_TA + "max_grad_norm",
        why="1.0, HF's default.",
        full="0.3 to 1.0",
        lora="0.3 to 1.0",
        mistakes="Reading the logged grad norm as post-clipping (it is the norm before clipping).",
    ),
    _k(
        "precision",
        what="Numeric precision of the forward/backward pass. bf16 keeps fp32's exponent range (8 bits) with "
        "less precision (7 mantissa bits, 2-3 significant digits), so it needs no loss scaling. fp16 has more "
        "precision (10 bits) but only 5 exponent bits: it overflows past 65504 and needs loss scaling to keep "
        "small gradients from underflowing. fp32 is exact but slower on GPUs.",
        hf="tunewise (TrainingArguments.bf16 / fp16)",
        why="auto: bf16 where the hardware supports it (NVIDIA Ampere or newer), fp16 on older GPUs, fp32 on "
        "CPU unless it multiplies bf16 in hardware (AMX or AVX512_BF16), where bf16 autocast measured ~1.5x "
        "fp32 (docs/performance.md).",
        interactions="bf16/fp16 flags (must agree); torch_dtype; bnb_4bit_compute_dtype.",
        mistakes="fp16 on a model pretrained in bf16: activations beyond 65504 overflow to inf and the loss "
        "turns NaN.",
    ),
    _k(
        "bf16",
        what="HF's flag for bf16 mixed precision; true means precision bf16.",
        hf=_TA + "bf16",
        why="null: precision decides.",
        interactions="precision (must agree); fp16 (not both).",
    ),
    _k(
        "fp16",
        what="HF's flag for fp16 mixed precision with dynamic loss scaling; true means precision fp16.",
        hf=_TA + "fp16",
        why="null: precision decides.",
        interactions="precision (must agree); bf16 (not both).",
    ),
    _k(
        "seed",
        what="Seeds Python, NumPy and PyTorch: adapter initialisation, dropout and everything random except "
        "data order (data_seed). Given to `generate` or `chat` (`--set seed=N`), it makes their sampling "
        "reproducible; without it each call samples afresh.",
        hf=_TA + "seed",
        why="42, HF's default.",
        mistakes="Expecting bit-identical GPU runs from a seed alone (some kernels are non-deterministic).",
    ),
    _k(
        "data_seed",
        what="Seed of the data order and of the validation split, separate from seed so the same data order "
        "can be kept while changing initialisation (or the reverse).",
        hf=_TA + "data_seed",
        why="null: the same as seed.",
    ),
    _k(
        "logging_steps",
        what="Log training loss, learning rate and grad norm every N optimizer steps; a value below 1 is a "
        "fraction of total steps (0.1 = ten logs per run), as in HF.",
        hf=_TA + "logging_steps",
        why="10: HF's 500 would show nothing on a short fine-tune.",
        mistakes="More steps between logs than the run has: metrics.jsonl gets a training row for the last step only.",
    ),
    _k(
        "eval_steps",
        what="Evaluate every N optimizer steps (or a fraction of the run, below 1).",
        hf=_TA + "eval_steps",
        why="null: evaluate only before and after training, which is cheap and shows the gain.",
        interactions="Needed by early stopping and load_best_model_at_end; save_steps must be a multiple of "
        "it for load_best_model_at_end.",
        mistakes="Evaluating so often that evaluation dominates run time.",
    ),
    _k(
        "save_steps",
        what="Write a checkpoint every N optimizer steps (or a fraction of the run, below 1).",
        hf=_TA + "save_steps",
        why="null: no checkpoints by step count (HF's default is 500); save_minutes still checkpoints a long "
        "run, and the end of a run, a Ctrl-C, SIGTERM or an error in a step always saves.",
        interactions="save_total_limit; save_minutes; load_best_model_at_end (must be a multiple of eval_steps).",
    ),
    _k(
        "save_minutes",
        what="Also write a checkpoint after any optimizer step that ends this many minutes (of wall time, "
        "evaluations included) after the last checkpoint or the start. Ctrl-C, SIGTERM and errors in a step "
        "already save; this bounds what a kill -9, the kernel's OOM killer, a lost machine or a power cut "
        "can take. Checkpoints are written between steps and change nothing a step computes, so a run trains "
        "the same with it on or off; which steps get a checkpoint depends on the machine's speed. Under "
        "several processes all save when any one is due.",
        hf="tunewise (HF saves by step count only: save_steps, default 500)",
        why="30: at most half an hour of training lost. A LoRA checkpoint (adapter and optimizer state) takes "
        "seconds; a full fine-tune's holds the model and AdamW's two moments (about 12 bytes a parameter in "
        "fp32) and may take minutes on a slow disk, so raise it there.",
        interactions="save_steps (either one triggers a checkpoint), save_total_limit (time-based checkpoints "
        "count towards it; the best one is still kept).",
        mistakes="A few minutes on a full fine-tune of a large model: the run spends much of its time writing.",
    ),
    _k(
        "save_total_limit",
        what="Keep at most this many checkpoints, deleting the oldest; the best checkpoint (the one "
        "load_best_model_at_end loads) is never deleted.",
        hf=_TA + "save_total_limit",
        why="2: the latest to resume from and one before it, without filling the disk.",
        mistakes="null on a long full fine-tune: each checkpoint holds the model and optimizer state.",
    ),
    _k(
        "load_best_model_at_end",
        what="At the end, restore the best checkpoint instead of keeping the last weights. As in HF "
        "(best_model_checkpoint), that is the newest checkpoint whose own step's evaluation was the best so far "
        "when it was saved: when the best evaluation falls between checkpoints (eval_steps 2, save_steps 4), an "
        "earlier one, or none, and then the last weights stay; a line says which. As in HF, save_steps must be "
        "a multiple of eval_steps so every checkpoint was evaluated.",
        hf=_TA + "load_best_model_at_end",
        why="false: the final weights are the default result.",
        interactions="eval_steps, save_steps, metric_for_best_model, greater_is_better.",
    ),
    _k(
        "metric_for_best_model",
        what="The metric that decides 'best' for early stopping and load_best_model_at_end: eval_loss, "
        "eval_perplexity, or a task metric (exact_match, json_exact_match).",
        hf=_TA + "metric_for_best_model",
        why="eval_loss: always available when there is validation data.",
        interactions="greater_is_better; task_metric must compute a task metric.",
        mistakes="Optimising eval_loss when the task metric is what matters: they can disagree.",
    ),
    _k(
        "greater_is_better",
        what="Whether a larger metric_for_best_model is better.",
        hf=_TA + "greater_is_better",
        why="null: false for eval_loss and eval_perplexity, true for task metrics. HF's default is false only for "
        "names ending in loss, so in HF eval_perplexity would count higher as better: set it explicitly there.",
        mistakes="true with a loss metric: the worst checkpoint wins.",
    ),
    _k(
        "early_stopping_patience",
        what="Stop training after this many evaluations in a row without an improvement of more than "
        "early_stopping_threshold in metric_for_best_model.",
        hf="EarlyStoppingCallback.early_stopping_patience",
        why="null: train for the planned length.",
        interactions="Needs eval_steps and validation data.",
        mistakes="Patience 1 with frequent, noisy evaluations: stops on noise.",
    ),
    _k(
        "early_stopping_threshold",
        what="How much the metric must improve to count as an improvement for early stopping.",
        hf="EarlyStoppingCallback.early_stopping_threshold",
        why="0.0: any improvement counts.",
        mistakes="A threshold tuned on an HF run's eval_loss: tunewise's eval_loss is the mean per target token "
        "over the whole validation set, HF's the mean of the per-batch means weighted by examples (it changes "
        "with per_device_eval_batch_size), so the two differ by a little; more so with answers of varied "
        "length (docs/training.md, Early stopping and the best model).",
    ),
    _k(
        "nonfinite_patience",
        what="How many consecutive steps with a NaN/inf loss or gradient are tolerated (the update is "
        "skipped) before nonfinite_policy acts.",
        hf="tunewise",
        why="3: one bad batch is survivable; three in a row means the run is diverging.",
        interactions="precision (fp16 overflows produce non-finite values); learning_rate.",
    ),
    _k(
        "nonfinite_policy",
        what="What to do after nonfinite_patience non-finite steps: stop with a diagnosis, or roll back to "
        "the last checkpoint and continue with half the learning rate.",
        hf="tunewise",
        why="stop: a diverging run usually needs a human decision (lower rate, other precision).",
        interactions="save_steps (rollback needs a checkpoint).",
    ),
    # ------------------------------------------------------------------------------------- generation
    _k(
        "max_new_tokens",
        what="The most tokens generated after the prompt; generation also stops at the end-of-sequence token "
        "and at the chat template's end-of-turn marker (<|im_end|>, <|eot_id|>, ...), which a base model "
        "trained on a named template may not have as its EOS.",
        hf=_GC + "max_new_tokens",
        why="128: enough for short answers in samples and task metrics, bounded so evaluation stays quick.",
        mistakes="Too small for the task's answers: the task metric fails on truncated output.",
    ),
    _k(
        "do_sample",
        what="false: greedy decoding, always the most likely next token (deterministic). true: sample from "
        "the distribution shaped by temperature, top_k and top_p.",
        hf=_GC + "do_sample",
        why="false: reproducible answers for evaluation and before/after comparisons.",
        interactions="temperature, top_k and top_p are ignored by greedy decoding. tunewise always passes its "
        "own do_sample (and, when sampling, temperature, top_p and top_k), so the settings a model recommends "
        "in its generation_config.json, which transformers and vLLM would use, do not apply: copy them into "
        "generation.* to decode as a model card advises.",
    ),
    _k(
        "temperature",
        what="Divides the logits before sampling: below 1 sharpens the distribution, above 1 flattens it. "
        "tunewise reads 0 as greedy decoding (transformers itself rejects 0 when sampling).",
        hf=_GC + "temperature",
        why="1.0: the model's own distribution.",
        interactions="Needs do_sample: true.",
        mistakes="Setting it with do_sample false: greedy decoding ignores it.",
    ),
    _k(
        "top_p",
        what="Nucleus sampling: keeps the smallest set of tokens whose cumulative probability reaches p, "
        "then renormalises; 1.0 keeps every token.",
        hf=_GC + "top_p",
        why="1.0: no truncation.",
        interactions="Needs do_sample: true; transformers applies temperature, then top-k, then top-p.",
        mistakes="Setting it with do_sample false: greedy decoding ignores it.",
    ),
    _k(
        "top_k",
        what="Top-k sampling: keeps the k most likely tokens and renormalises; 0 disables the filter.",
        hf=_GC + "top_k",
        why="50, HF's default.",
        interactions="Needs do_sample: true; combined with top_p, both filters apply.",
        mistakes="Setting it with do_sample false: greedy decoding ignores it.",
    ),
    _k(
        "repetition_penalty",
        what="Penalises every token already present in the prompt or the output: a positive logit is divided "
        "by the penalty, a negative one multiplied (CTRL paper). 1.0 disables it.",
        hf=_GC + "repetition_penalty",
        why="1.0: a fine-tuned model should not need it; use it to diagnose loops.",
        mistakes="Values well above 1.2: the model avoids words it must repeat (names, JSON keys).",
    ),
    # ------------------------------------------------------------------------------------- evaluation
    _k(
        "task_metric",
        what="A metric computed by generating answers for the validation prompts: exact_match compares the "
        "generated text with the reference; json_exact_match parses both as JSON and compares the values, so "
        "key order and spacing do not matter (true matches only true, not 1; 1 and 1.0 are one number). auto "
        "chooses from the validation answers, once, before training (the plan shows its choice).",
        hf="tunewise",
        why="auto: json_exact_match when every validation answer is a JSON object or array (builtin:json_extract), "
        "else exact_match; none for plain-text data (format text), which has no prompt to answer. Each costs a "
        "generation pass over the validation prompts before and after training.",
        interactions="metric_for_best_model can name the task metric; max_new_tokens.",
        mistakes="Trusting eval loss alone for a task whose answers must be exact.",
    ),
    _k(
        "max_eval_samples",
        what="Caps how many validation rows are used for eval loss and the task metric, to bound evaluation "
        "time.",
        hf="tunewise (as max_eval_samples in HF's example scripts)",
        why="null: use every validation row.",
        interactions="eval_steps (frequent evaluation of a big set is slow).",
    ),
    _k(
        "num_sample_prompts",
        what="How many held-out prompts are shown with the model's answers before and after training, so the "
        "change is visible and not only a number.",
        hf="tunewise",
        why="3: enough to see a difference, short enough to read.",
        interactions="The answers are the task metric's; with task_metric none only these prompts are answered. "
        "Plain-text data has no prompts, so no samples.",
    ),
]

KNOWLEDGE: dict[str, Knowledge] = {entry.key: entry for entry in _ENTRIES}
"""Every schema key's explanation, by bare key name."""


def explain_key(key: str) -> RenderableType:
    """Rich-markup explanation of one key (`lora_alpha` or `adapter.lora_alpha`), or a section's listing."""
    name = key.strip().split(".")[-1]
    if key.strip() in SECTIONS:
        return _section_listing(key.strip())
    if name not in KNOWLEDGE or ("." in key and key.strip() != f"{KNOWLEDGE[name].section}.{name}"):
        raise ValueError(f"{key}: {_unknown(key)}")
    return _render(KNOWLEDGE[name])


def explain_all() -> Group:
    """Every key, grouped by section, with its one-line summary."""
    listings: list[RenderableType] = []
    for section in SECTIONS:
        listings += [_section_listing(section), ""]
    return Group(*listings[:-1])


def _unknown(key: str) -> str:
    name = key.strip().split(".")[-1]
    if name in KNOWLEDGE:
        return f"unknown key; did you mean `{KNOWLEDGE[name].section}.{name}`?"
    match = suggest(name, [*KNOWLEDGE, *SECTIONS])
    return (
        f"unknown key; did you mean `{match}`?" if match else "unknown key; `tunewise explain` lists them all"
    )


def _section_listing(section: str) -> Group:
    """The section's keys and summaries; a summary wraps within its own column, under itself."""
    rows = Table.grid(padding=(0, 2))
    rows.add_column(no_wrap=True)
    rows.add_column()
    for key in SECTIONS[section].model_fields:
        rows.add_row(key, escape(KNOWLEDGE[key].summary))
    return Group(f"[bold]{section}[/bold]", Padding(rows, (0, 0, 0, 2)))


def _render(entry: Knowledge) -> str:
    default = SECTIONS[entry.section].model_fields[entry.key].get_default(call_default_factory=True)
    parts = [
        f"[bold]{entry.section}.{entry.key}[/bold]  (HF: {escape(entry.hf_name)})",
        _para(entry.summary),
        _block("What it does", entry.what),
        _block(
            f"Default: {escape(default if isinstance(default, str) else show(default))}", entry.default_why
        ),
    ]
    typical = [f"full fine-tuning: {entry.typical_full}"] if entry.typical_full else []
    typical += [f"LoRA / QLoRA: {entry.typical_lora}"] if entry.typical_lora else []
    if typical:
        parts.append("[bold]Typical[/bold]\n" + "\n".join(_para(t) for t in typical))
    if entry.interactions:
        parts.append(_block("Interacts with", entry.interactions))
    if entry.mistakes:
        parts.append(_block("Common mistakes", entry.mistakes))
    return "\n\n".join(parts)


def _block(title: str, text: str) -> str:
    return f"[bold]{title}[/bold]\n{_para(text)}"


def _para(text: str) -> str:
    # 78 columns: rich wraps longer lines itself and would lose the indent on an 80-column terminal.
    return escape(textwrap.fill(text, width=78, initial_indent="  ", subsequent_indent="  "))
