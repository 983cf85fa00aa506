"""Chat with a baked GGUF in llama-cpp-python, using the chat template stored in the file.

    python examples/chat_gguf.py MODEL.gguf ["your message"]

Also prints the cosmic-bake provenance the GGUF carries (direction hash, layer, mode).
"""

import argparse

from gguf import GGUFReader

from cosmic_bake.model.llamacpp import open_llama  # llama_cpp.Llama, safe on CPUs with Intel AMX

parser = argparse.ArgumentParser()
parser.add_argument("gguf")
parser.add_argument("message", nargs="?", default="Write a haiku about refusal directions.")
parser.add_argument("--max-tokens", type=int, default=48)
args = parser.parse_args()

reader = GGUFReader(args.gguf)
for name, field in reader.fields.items():
    if name.startswith("cosmic_bake."):
        print(f"{name} = {field.contents()}")

llm = open_llama(args.gguf, n_ctx=512, verbose=False)
reply = llm.create_chat_completion(
    messages=[{"role": "user", "content": args.message}], max_tokens=args.max_tokens, temperature=0.0
)
print("assistant:", reply["choices"][0]["message"]["content"])
