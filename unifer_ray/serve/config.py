"""What the Serve application is made from: one typed config, read from a Serve config file's application args.

`configs/serve.yaml` is a regular Ray Serve config file (`serve run configs/serve.yaml`, `serve deploy ...`):
its one application imports `unifer_ray.serve.app:build_app`, and the application's `args` are a `ServeConfig`:
Ray Serve LLM's own `LLMConfig` for the model (vLLM engine arguments, autoscaling, placement) plus our ingress,
API key, limits and `/v1/fer` settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from unifer_ray.config import ConfigError, parse_config, read_yaml


class IngressConfig(BaseModel):
    """The HTTP ingress deployment (our `OpenAiIngress` subclass): auth, limits, image checks, on CPUs."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(0.5, ge=0)
    min_replicas: int = Field(1, ge=0)  # 0 only with a model that scales to zero too
    max_replicas: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check_range(self) -> IngressConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class LimitsConfig(BaseModel):
    """What a request may hold. Anything beyond is refused with a 4xx before it reaches the model."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0)
    max_image_bytes: int = Field(4 * 1024 * 1024, gt=0)  # one encoded image, after base64 decoding
    max_image_pixels: int = Field(2048 * 2048, gt=0)  # checked from the header, before decoding
    max_aspect_ratio: float = Field(100.0, ge=1)  # long side / short side (Qwen2.5-VL's processor fails above 200)
    max_images: int = Field(4, gt=0)  # per request
    max_text_chars: int = Field(16_000, gt=0)  # all text parts of a request together
    max_tokens: int = Field(1024, gt=0)  # the largest max_tokens a request may ask for
    default_max_tokens: int = Field(256, gt=0)  # when a request does not say
    max_n: int = Field(8, gt=0)
    # Images are read from base64 data URLs only. An http(s) URL is fetched only when it starts with one of these
    # prefixes (each `scheme://host[:port]/path/`, ending in "/"), without following redirects.
    allowed_image_url_prefixes: list[str] = Field(default_factory=list)
    fetch_timeout_s: float = Field(5.0, gt=0)

    @field_validator("allowed_image_url_prefixes")
    @classmethod
    def _check_prefixes(cls, prefixes: list[str]) -> list[str]:
        for prefix in prefixes:
            parts = urlsplit(prefix)
            if parts.scheme not in ("http", "https") or not parts.hostname or not parts.path.endswith("/"):
                raise ValueError(f"{prefix!r} is not an http(s)://host/path/ prefix ending in '/'")
            if parts.username or parts.password or parts.query or parts.fragment:
                raise ValueError(f"{prefix!r} must not hold credentials, a query or a fragment")
        return prefixes

    @model_validator(mode="after")
    def _check_tokens(self) -> LimitsConfig:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens ({self.max_tokens})")
        return self


class FerConfig(BaseModel):
    """`POST /v1/fer`: the FERBench prompt on an image resized as in the benchmark, greedy decoding."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(224, gt=0)
    max_new_tokens: int = Field(256, gt=0)


class ServeConfig(BaseModel):
    """The application's args: Ray Serve LLM's own `LLMConfig` for the model, and what this project adds."""

    model_config = ConfigDict(extra="forbid")

    # ray.serve.llm.LLMConfig, as a mapping (its keys are checked by LLMConfig itself, unknown ones refused):
    # model_loading_config.model_id is the model name clients send; model_source a local directory, s3:// prefix or
    # hub id (engine_kwargs.revision its revision); engine_kwargs are vLLM's engine arguments; deployment_config
    # holds autoscaling.
    llm_config: dict[str, Any]
    # The name of the variable holding the API key (never the key). When set, every /v1 route needs
    # `Authorization: Bearer <key>`; the variable must be set where the app is built (under `serve deploy`, a task on
    # the cluster: the KubeRay pods get it from a secret).
    api_key_env: str | None = None
    # Or the key's SHA-256 (hex) itself, which is all the app keeps: a deploy file written where the key is
    # (`unifer serve-config`), for a cluster whose nodes do not hold the key.
    api_key_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    fer: FerConfig = Field(default_factory=FerConfig)

    @field_validator("llm_config")
    @classmethod
    def _check_llm_config(cls, value: dict[str, Any]) -> dict[str, Any]:
        from ray.serve.llm import LLMConfig

        LLMConfig.model_validate(value)  # its errors name the field
        return value

    @model_validator(mode="after")
    def _one_key(self) -> ServeConfig:
        if self.api_key_env and self.api_key_sha256:
            raise ValueError("give api_key_env or api_key_sha256, not both")
        return self

    @property
    def model_name(self) -> str:
        return self.llm_config["model_loading_config"]["model_id"]

    @property
    def model_source(self) -> str:
        return self.llm_config["model_loading_config"].get("model_source") or self.model_name


def deploy_file(path: str | Path) -> dict:
    """The Serve config file at `path` with the application's `api_key_env` replaced by `api_key_sha256`, the digest
    of that variable's value here: a file to `serve deploy` to a cluster whose nodes do not hold the key."""
    import hashlib
    import os

    data = read_yaml(path)
    file = load_serve_file(path)  # checks the file first
    args = data["applications"][0]["args"]
    name = file.config.api_key_env
    if name is None:
        raise ConfigError(f"{path}: applications.0.args.api_key_env is not set: there is no API key to digest")
    key = os.environ.get(name, "").strip()
    if not key:
        raise ConfigError(f"{path}: api_key_env: the API key variable ${name} is not set in this shell")
    del args["api_key_env"]
    args["api_key_sha256"] = hashlib.sha256(key.encode()).hexdigest()
    return data


@dataclass
class ServeFile:
    """The parts of a Serve config file that `unifer serve` uses: where to listen, and the app's config."""

    proxy_location: str
    http_options: dict
    app_name: str
    route_prefix: str
    config: ServeConfig


def load_serve_file(path: str | Path) -> ServeFile:
    """Read a Serve config file holding exactly one application whose args are a ServeConfig."""
    from ray.serve.schema import ServeDeploySchema

    path = Path(path)
    data = read_yaml(path)
    schema = parse_config(data, ServeDeploySchema, source=f"{path} (Serve config file)")
    if len(schema.applications) != 1:
        raise ConfigError(f"{path}: applications: expected exactly one application, found {len(schema.applications)}")
    app = schema.applications[0]
    config = parse_config(app.args, ServeConfig, source=f"{path} [applications.0.args]")
    return ServeFile(
        proxy_location=schema.proxy_location.value,
        http_options=schema.http_options.model_dump(exclude_unset=True),
        app_name=app.name,
        route_prefix=app.route_prefix or "/",
        config=config,
    )
