"""A container-image definition for a function a zip cannot hold (numba, or over 250 MB).

The image is AWS Lambda's Python base image with the function's code, models and
dependencies. numba's cache is compiled at image build by ``shardserve warmup`` into a
directory that is read-only at run time; ``plugins/kernels/numba_env.py`` copies it to /tmp,
the one writable place, on first use (docs/numba.md).
"""

from __future__ import annotations

from pathlib import Path

BASE_IMAGE = "public.ecr.aws/lambda/python:{version}"

DOCKERFILE = """\
# {function}: built by `shardserve package` (docs/serverless.md#container-images).
# Build from the project root:
#   docker build --platform linux/{docker_arch} -f {dockerfile} -t shardserve-{function} .
FROM {base}

COPY {requirements} /tmp/requirements.txt
RUN pip install --no-cache-dir --no-deps -r /tmp/requirements.txt --target "$LAMBDA_TASK_ROOT" \\
 && rm /tmp/requirements.txt

COPY runtime ${{LAMBDA_TASK_ROOT}}/runtime
COPY handlers ${{LAMBDA_TASK_ROOT}}/handlers
COPY plugins ${{LAMBDA_TASK_ROOT}}/plugins
{model_copies}
# bytecode now: /var/task is read-only, so a cold start could not cache it
RUN python -m compileall -q --invalidation-mode unchecked-hash "$LAMBDA_TASK_ROOT"
ENV SHARDSERVE_REPOSITORY=${{LAMBDA_TASK_ROOT}}/models \\
    SHARDSERVE_LOAD=lazy \\
    NUMBA_CACHE_DIR=/opt/shardserve/numba-cache \\
    PYTHONPATH=${{LAMBDA_TASK_ROOT}}

# numba's cache compiled now, read-only at run time (copied to /tmp on first use).
RUN mkdir -p /opt/shardserve/numba-cache \\
 && python -m handlers.cli warmup --repository "$LAMBDA_TASK_ROOT/models" \\
 && chmod -R a-w /opt/shardserve/numba-cache

CMD ["handlers.lambda_handler.handler"]
"""


def render_dockerfile(function: str, python_version: str, architecture: str,
                      models_at: str, models: list[str], requirements: str,
                      dockerfile: str) -> str:
    """The Dockerfile text; paths are relative to the project root (the build context)."""
    copies = "\n".join(f"COPY {Path(models_at, m).as_posix()} ${{LAMBDA_TASK_ROOT}}/models/{m}"
                       for m in models)
    return DOCKERFILE.format(
        function=function, base=BASE_IMAGE.format(version=python_version),
        docker_arch="arm64" if architecture == "arm64" else "amd64",
        requirements=requirements, model_copies=copies, dockerfile=dockerfile)
