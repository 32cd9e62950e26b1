# GPU image: CUDA PyTorch base, non-root user, model cache and database on the /data volume.
#   docker build -t imagine-bot .
#   docker run -d --gpus all --env-file .env -v imagine-data:/data imagine-bot
# The first start downloads the model into /data, registers the slash commands and logs the
# invite link (`docker logs`); later starts find both done. For a host without network, fetch
# the model beforehand (`docker run --rm -v imagine-data:/data imagine-bot python -m bot
# download`) and run with -e HF_HUB_OFFLINE=1. `python -m bot doctor` checks the set-up.
# The base image's torch must meet pyproject's floor (2.7: TORCH_COMPILE needs it), or
# `pip install .` replaces it with a CUDA build of its own choosing.
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DATABASE_PATH=/data/bot.sqlite3 \
    MODEL_CACHE=/data/models \
    HF_HOME=/data/huggingface

RUN useradd --create-home --uid 1000 bot && mkdir /data && chown bot:bot /data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY cogs ./cogs
# With the ray extra, the same image also serves as an EXECUTOR=ray GPU worker (README).
RUN pip install '.[ray]'

USER bot
VOLUME /data
CMD ["python", "-m", "bot"]
