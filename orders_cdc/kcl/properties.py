"""The daemon's .properties file: parse, check every key, render the effective file.

The daemon silently ignores a misspelt key (a misspelt endpoint then sends traffic to real
AWS), keeps trailing spaces, and has no inline comments. We refuse all of that at start,
with one line that names the key and the line.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from orders_cdc.errors import SettingsError

# Setters of MultiLangDaemonConfiguration (KCL 3.1.3, read with javap) as bean property
# names, plus the daemon's own keys. Nested builder beans are checked by prefix.
KNOWN_KEYS = frozenset(
    """
    executableName processingLanguage maxActiveThreads
    allowThroughputOvershoot applicationName AwsCredentialsProvider AwsCredentialsProviderCloudWatch
    AwsCredentialsProviderDynamoDB callProcessRecordsEvenForEmptyRecordList cleanupLeasesUponShardCompletion
    clientVersionConfig coordinatorStateBillingMode coordinatorStateDeletionProtectionEnabled
    coordinatorStatePointInTimeRecoveryEnabled coordinatorStateReadCapacity coordinatorStateTableName
    coordinatorStateTags coordinatorStateWriteCapacity dampeningPercentage disableWorkerMetrics
    dynamoDBEndpoint enablePriorityLeaseAssignment failoverTimeMillis gracefulLeaseHandoffTimeoutMillis
    idleTimeBetweenReadsInMillis ignoreUnexpectedChildShards inMemoryWorkerMetricsCaptureFrequencyMillis
    initialLeaseTableReadCapacity initialLeaseTableWriteCapacity initialPositionInStream
    initialPositionInStreamExtended isGracefulLeaseHandoffEnabled kinesisEndpoint
    leaseAssignmentIntervalMillis leaseTableDeletionProtectionEnabled leaseTablePitrEnabled
    listShardsBackoffTimeInMillis logWarningForTaskAfterMillis maxGetRecordsThreadPool
    maxLeaseRenewalThreads maxLeasesForWorker maxLeasesToStealAtOneTime maxListShardsRetryAttempts
    maxRecords maxThroughputPerHostKBps metricsBufferTimeMillis metricsEnabledDimensions metricsLevel
    metricsMaxQueueSize millisBehindLatestThresholdForReducedTps noOfPersistedMetricsPerWorkerMetrics
    parentShardPollIntervalMillis reBalanceThresholdPercentage regionName retrievalMode
    retryGetRecordsInSeconds schedulerInitializationBackoffTimeMillis shardPrioritization
    shardSyncIntervalMillis shutdownGraceMillis skipShardSyncAtWorkerInitializationIfLeasesExist
    staleWorkerMetricsEntryCleanupDuration streamArn streamName tableName taskBackoffTimeMillis
    timeoutInSeconds validateSequenceNumberBeforeCheckpointing varianceBalancingFrequency workerId
    workerIdentifier workerMetricsBillingMode workerMetricsDeletionProtectionEnabled workerMetricsEMAAlpha
    workerMetricsPointInTimeRecoveryEnabled workerMetricsReadCapacity workerMetricsReporterFreqInMillis
    workerMetricsTableName workerMetricsTags workerMetricsWriteCapacity
    """.split()
)
NESTED_PREFIXES = ("kinesisClient.", "dynamoDbClient.", "cloudWatchClient.", "fanoutConfig.")
REQUIRED = ("executableName", "applicationName", "AwsCredentialsProvider")
_ENUMS = {
    "retrievalMode": ("POLLING", "FANOUT", "DEFAULT"),
    "metricsLevel": ("NONE", "SUMMARY", "DETAILED"),
    "initialPositionInStream": ("TRIM_HORIZON", "LATEST"),
}
# Primitive settings equal to Java's default (0/false) are skipped by the configurator,
# so writing them has no effect: say so instead of letting the user believe otherwise.
_NO_EFFECT_FALSE = ("cleanupLeasesUponShardCompletion",)


@dataclass(frozen=True, slots=True)
class Entry:
    line: int
    key: str
    value: str


def parse(text: str, source: str = "app.properties") -> dict[str, Entry]:
    entries, problems = parse_all(text, source)
    if problems:
        raise SettingsError(problems[0])
    return entries


def parse_all(text: str, source: str = "app.properties") -> tuple[dict[str, Entry], list[str]]:
    """Every entry that parses, and one line per problem (with its line number)."""
    entries: dict[str, Entry] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped[0] in "#!":
            continue
        match = re.match(r"^\s*([^=:\s]+)\s*[=:]?\s*(.*)$", raw)
        if not match:
            problems.append(f"{source}:{number}: cannot parse {raw!r}")
            continue
        key, value = match.group(1), match.group(2)
        if value != value.rstrip():
            problems.append(f"{source}:{number}: trailing spaces after {key}'s value (Java keeps them)")
        elif re.search(r"\s#", value):
            problems.append(f"{source}:{number}: {key} has an inline '#' comment; Java reads it as part of the value")
        elif key in entries:
            problems.append(f"{source}:{number}: {key} is set twice (first on line {entries[key].line})")
        else:
            entries[key] = Entry(number, key, value)
    return entries, problems


def _canonical(key: str) -> str:
    return "AwsCredentialsProvider" + key[len("awscredentialsprovider"):] if key.lower().startswith("awscredentialsprovider") else key


def validate(entries: Mapping[str, Entry], source: str = "app.properties") -> None:
    problems = check(entries, source)
    if problems:
        raise SettingsError(problems[0])


def check(entries: Mapping[str, Entry], source: str = "app.properties") -> list[str]:
    """One line per problem. An entry on line 0 came from the environment, not the file."""
    problems = []
    for key, entry in entries.items():
        where = f"{source}:{entry.line}" if entry.line else f"{source} (from the environment)"
        canonical = _canonical(key)
        if canonical not in KNOWN_KEYS and not canonical.startswith(NESTED_PREFIXES):
            close = difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.6) or [
                k for k in KNOWN_KEYS if k.lower() == key.lower()
            ]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{where}: unknown key {key!r}{hint}; the daemon would silently ignore it")
            continue
        allowed = _ENUMS.get(canonical)
        if allowed and entry.value.upper() not in allowed:
            problems.append(f"{where}: {key}={entry.value!r}: expected one of {', '.join(allowed)}")
        if canonical in _NO_EFFECT_FALSE and entry.value.lower() == "false":
            problems.append(f"{where}: {key}=false has no effect (the daemon skips Java defaults)")
    if "initialPositionInStream" in entries and "initialPositionInStreamExtended" in entries:
        problems.append(f"{source}: set only one of initialPositionInStream and initialPositionInStreamExtended")
    for key in REQUIRED:
        if not any(_canonical(k) == key for k in entries):
            problems.append(f"{source}: {key} is missing")
    if "streamName" not in entries and "streamArn" not in entries:
        problems.append(f"{source}: streamName (or streamArn) is missing")
    return problems


def set_position(values: dict[str, str], position: str | datetime) -> None:
    """The start position for leases created from now on (existing leases keep their checkpoint)."""
    values.pop("initialPositionInStream", None)
    values.pop("initialPositionInStreamExtended", None)
    if isinstance(position, datetime):
        # The converter multiplies by 1000: the value is epoch seconds.
        values["initialPositionInStreamExtended"] = str(int(position.timestamp()))
    else:
        values["initialPositionInStream"] = position


def render(values: Mapping[str, str]) -> str:
    broken = [key for key, value in values.items() if "\n" in value or "\r" in value]
    if broken:  # settings.load refuses these first; never write a line the value did not mean
        raise ValueError(f"line break in the value of {', '.join(broken)}")
    lines = ["# Generated by orders-cdc from app.properties and the environment. Do not edit."]
    lines += [f"{key} = {value}" for key, value in values.items()]
    return "\n".join(lines) + "\n"
