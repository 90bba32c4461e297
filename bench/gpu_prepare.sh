#!/usr/bin/env bash
# Prepare, on the build machine, what bench/gpu_check.sh carries to a GPU machine that has torch,
# transformers, peft and safetensors but not optuna (nor the packaged SmolLM2 for a tokenizer):
#   bash bench/gpu_prepare.sh      # writes .whl/ (wheels for Python 3.12) and .gpu/tokenizer/
# then run gpu_check.sh there with carry [".whl", ".gpu"]. Both folders are git-ignored (.git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
for d in /.whl/ /.gpu/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
mkdir -p .whl .gpu/tokenizer
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
for pkg in optuna==$(.venv/bin/python -c "import optuna; print(optuna.__version__)") alembic sqlalchemy colorlog mako greenlet; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl "$pkg"
done
tok=$(.venv/bin/python -c "from bench.synthetic import tokenizer_folder; print(tokenizer_folder())")
cp "$tok"/tokenizer.json "$tok"/tokenizer_config.json .gpu/tokenizer/
[ -f "$tok/chat_template.jinja" ] && cp "$tok/chat_template.jinja" .gpu/tokenizer/
du -sh .whl .gpu
