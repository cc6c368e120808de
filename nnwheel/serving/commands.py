"""The command line of serving: `nnwheel serve` and `nnwheel deploy`."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..urls import port
from .dockerfile import TORCH_CPU_INDEX, default_base_image
from .engines import ENGINES


def add_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve an installed model over HTTP (needs nnwheel[serve])",
        description="Serve an installed model package with uvicorn: POST /predict {\"data\": ...}, the Open "
        "Inference Protocol (KServe V2) under /v2, and Prometheus metrics at /metrics. Concurrent "
        "requests are merged into one model call when the model gives each row identical results in "
        "every batch size (checked at start; never for inputs with a free dimension besides the batch, "
        "whose sizes a check cannot all try). SIGTERM finishes the requests in flight, then stops.",
        epilog="example: nnwheel serve mnist-mlp --port 8080, then "
        "curl -X POST localhost:8080/predict -d '{\"data\": [[...]]}'",
    )
    serve.add_argument("name", metavar="NAME", help="an installed model, e.g. mnist-mlp (see nnwheel list)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface "
                       "(default: %(default)s)")
    serve.add_argument("--port", type=port, default=8080, help="port (default: %(default)s)")
    serve.add_argument("--grpc-port", type=port, metavar="PORT",
                       help="also serve the Open Inference Protocol over gRPC (KServe's GRPCInferenceService) on "
                       "this port, with the same model, batching and metrics (needs nnwheel[grpc])")
    serve.add_argument("--workers", type=int, default=1, help="server processes, each with its own copy of the "
                       "model (default: %(default)s)")
    batching = serve.add_argument_group("micro-batching")
    batching.add_argument("--no-batching", dest="batching", action="store_false",
                          help="run every request on its own")
    batching.add_argument("--inexact-batching", action="store_true",
                          help="merge requests even when the model rounds a row differently in a bigger batch "
                          "(more throughput; results may differ from single calls in the last bits)")
    batching.add_argument("--max-batch", type=int, default=32, help="most rows per model call (default: %(default)s)")
    batching.add_argument("--max-wait-ms", type=float, default=5.0,
                          help="longest wait for more requests while others are arriving (default: %(default)s)")
    serve.add_argument("--max-body-mb", type=float, default=32.0,
                       help="larger request bodies are refused with 413 (default: %(default)s)")
    serve.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> None:
    from ..errors import MissingDependencyError, UsageError

    if args.workers < 1 or args.max_batch < 1 or args.max_wait_ms < 0 or args.max_body_mb <= 0:
        raise UsageError("--workers and --max-batch are at least 1, --max-wait-ms at least 0, --max-body-mb above 0")
    if args.grpc_port is not None and args.grpc_port == args.port:
        raise UsageError(f"--grpc-port and --port are both {args.port}; gRPC and HTTP need a port each")
    try:
        from .app import ServeOptions
        from .serve import serve
    except ImportError as error:
        raise MissingDependencyError(f"nnwheel serve needs {error.name}: pip install 'nnwheel[serve]'") from None
    if args.grpc_port is not None:
        try:
            from . import grpc_service  # noqa: F401
        except ImportError as error:
            raise MissingDependencyError(f"nnwheel serve --grpc-port needs {error.name}: pip install 'nnwheel[grpc]'") from None
    serve(
        ServeOptions(
            name=args.name, host=args.host, port=args.port, workers=args.workers, batching=args.batching,
            inexact_batching=args.inexact_batching, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
            max_body_bytes=int(args.max_body_mb * 1024 * 1024), grpc_port=args.grpc_port,
        )
    )


def add_deploy(commands: argparse._SubParsersAction) -> None:
    deploy = commands.add_parser(
        "deploy",
        help="write (and with --build, build) the image and Kubernetes manifests that serve a model from an index",
        description="Write DIR/Dockerfile (pip installs NAME==VERSION and nnwheel[serve] from the index into a "
        "venv, which a second stage copies onto the base image; nnwheel serve runs as a non-root user, with a "
        "HEALTHCHECK) and DIR/kubernetes.yaml (a Deployment with probes on the V2 health endpoints and "
        "resource limits, a Service and a HorizontalPodAutoscaler). --build builds the image with docker "
        "(where its daemon answers), podman or buildah; --run then starts it and waits until it is ready.",
        epilog="example: nnwheel deploy mnist-mlp --index https://devpi.example.com/team/models/+simple/ "
        "--build --run",
    )
    deploy.add_argument("name", metavar="NAME", help="the model's distribution name, e.g. mnist-mlp")
    deploy.add_argument("--index", required=True, metavar="URL",
                        help="the package index the image installs from: the URL pip takes as --index-url")
    deploy.add_argument("--version", help="the model version to deploy (default: the newest on the index)")
    deploy.add_argument("--out", type=Path, default=Path("deploy"), metavar="DIR",
                        help="where to write the files (default: %(default)s)")
    deploy.add_argument("--image", help="the image reference the Deployment runs, in your registry "
                        "(default: NAME:VERSION)")
    deploy.add_argument("--base-image", metavar="IMAGE", help="the image to install onto; it needs python3 with "
                        f"its venv module, of the Python the model's wheels are for (default: {default_base_image()})")
    deploy.add_argument("--torch-index", default=TORCH_CPU_INDEX, metavar="URL",
                        help="the extra index pip finds torch on: CUDA builds with "
                        "https://download.pytorch.org/whl/cu126, none where --index holds the torch to install "
                        "(default: the CPU builds, %(default)s)")
    build = deploy.add_argument_group("building and running the image here")
    build.add_argument("--build", action="store_true", help="build the image, tagged as --image (log: DIR/build.log)")
    build.add_argument("--engine", choices=ENGINES, help="the container engine (default: docker where its daemon "
                       "answers, else podman, else buildah)")
    build.add_argument("--run", dest="run_image", action="store_true", help="after --build, run the image as `docker run -p PORT:8080` "
                       "does and wait until it is ready (docker or podman)")
    build.add_argument("--port", type=port, default=8080, help="the port --run publishes (default: %(default)s)")
    deploy.set_defaults(run=_run_deploy)


def _run_deploy(args: argparse.Namespace) -> None:
    from ..errors import ContainerEngineError, UsageError
    from .container_run import check_port_free, run_container
    from .deploy import DeployOptions, deploy
    from .engines import find_engine
    from .image_build import build_image

    if (args.engine or args.run_image) and not args.build:
        raise UsageError("--engine and --run go with --build: add --build")
    engine = find_engine(args.engine) if args.build else None  # before anything is written
    if args.run_image:
        if not engine.runs_containers:
            raise ContainerEngineError("--run: buildah builds images but runs no server; install podman or Docker")
        check_port_free(args.port)  # before minutes of building
    options = DeployOptions(args.index, args.version, args.image, args.base_image, args.torch_index)
    done = deploy(args.name, args.out, options)
    dockerfile, manifests = (shlex.quote(str(path)) for path in done.files)
    print(f"wrote {dockerfile} and {manifests} for {done.name} {done.version}")
    # Quoted, so that the lines can be pasted into a shell whatever --out holds.
    folder, image = shlex.quote(str(done.files[0].parent)), shlex.quote(done.image)
    if engine is None:
        print(f"next: docker build -t {image} {folder} && docker push {image}")
        print(f"      kubectl apply -f {manifests}")
        return
    print(f"building {image} with {engine.name} (log: {shlex.quote(str(done.files[0].parent / 'build.log'))})")
    built = build_image(engine, done.files[0].parent, done.image, done.base_image)
    print(f"built {image}: {built.size}, in {built.seconds:.0f} s")
    if args.run_image:
        running = run_container(engine, done.image, done.container_name, args.port)
        print(f"ready at {running.url} in {running.seconds_to_ready:.1f} s: curl -X POST {running.url}/predict -d "
              f"'{{\"data\": [[...]]}}'")
        print(f"stop: {engine.name} stop {running.name} && {engine.name} rm {running.name}")
    else:
        print(f"next: {engine.name} push {image} && kubectl apply -f {manifests}")
