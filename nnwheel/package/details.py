"""What wrap's options say of the package itself: its name, version, requirements and metadata, checked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError, first_line
from ..names import PackageName, parse_package_name, parse_version
from ..sources.source import ModelSource
from .render import ProjectMetadata


@dataclass(frozen=True)
class PackageDetails:
    names: PackageName
    version: str
    requires: tuple[str, ...]  # --requires, beside what the model needs
    summary: str | None
    license: str | None  # SPDX, canonical
    author: str | None
    model_card: str | None  # the --readme's Markdown


def check_details(
    name: str, version: str, requires: Sequence[str], summary: str | None, license: str | None,
    author: str | None, readme: Path | None,
) -> PackageDetails:
    return PackageDetails(
        names=parse_package_name(name),
        version=parse_version(version),
        requires=_check_requirements(requires),
        summary=summary,
        license=_check_license(license),
        author=author,
        model_card=_read_model_card(readme),
    )


def project_metadata(details: PackageDetails, source: ModelSource) -> ProjectMetadata:
    format = source.checkpoint.format.value
    return ProjectMetadata(
        summary=details.summary or f"{details.names.distribution}: a {format} model packaged by nnwheel",
        requirements=(*source.requirements, *details.requires),
        model_card=details.model_card or source.model_card,
        license=details.license or source.license,
        author=details.author,
    )


def _check_requirements(requires: Sequence[str]) -> tuple[str, ...]:
    from packaging.requirements import InvalidRequirement, Requirement

    for text in requires:
        try:
            Requirement(text)
        except InvalidRequirement as error:
            raise UsageError(f"--requires {text!r} is not a valid requirement ({first_line(error)}); e.g. 'pillow>=10'") from None
    return tuple(requires)


def _check_license(license: str | None) -> str | None:
    if license is None:
        return None
    from packaging.licenses import (
        InvalidLicenseExpression,
        canonicalize_license_expression,
    )

    try:
        return str(canonicalize_license_expression(license))
    except InvalidLicenseExpression as error:
        raise UsageError(f"--license {license!r}: {error}; use an SPDX expression such as MIT or Apache-2.0") from None


def _read_model_card(readme: Path | None) -> str | None:
    if readme is None:
        return None
    try:
        return readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--readme {readme} cannot be read ({error})") from None
