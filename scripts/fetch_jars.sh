#!/usr/bin/env bash
# Fetches the delta-spark jars (the native Delta engine) ONCE into .jars/ at the repo root.
#
#   io.delta:delta-spark_2.13:4.0.1   Spark's format("delta"), DeltaTable, MERGE
#   io.delta:delta-storage:4.0.1      its LogStore layer
#
# Their other runtime dependencies are already in pyspark's own jars folder (scala-library
# 2.13, antlr4-runtime 4.13.1); Spark, Hadoop and the cloud SDKs are "provided" in the poms.
# Matches the pip delta-spark==4.0.1 Python API and pyspark 4.0.x (Scala 2.13).
#
# Maven (mvn, with -C: strict checksums) downloads them from Maven's default repository and
# checks them against the repository's .sha1; this script checks them again against the sha1
# pinned below, writes each into .jars/ under a temporary name and renames it into place, so
# a reader never sees half a jar. A second run, with the jars present and matching, does no
# download (milliseconds). Jobs and tests never fetch: they only look in .jars/.
#
# Env: TOWERLAKE_JARS (folder, default <repo>/.jars).
set -euo pipefail
cd "$(dirname "$0")/.."
JARS=${TOWERLAKE_JARS:-$PWD/.jars}

# group:artifact:version  sha1 of the jar (as the repository publishes it)
ARTIFACTS=(
  "io.delta:delta-spark_2.13:4.0.1 3e469898dc4ed083c735ae360beb063adcd12e9d"
  "io.delta:delta-storage:4.0.1 ebc5384d953c1d70d0ce4ceee42892da74051a81"
)
DEPENDENCY_PLUGIN=org.apache.maven.plugins:maven-dependency-plugin:3.8.1

log() { printf '[fetch_jars %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '[fetch_jars] ERROR: %s\n' "$*" >&2; exit 1; }
jar_name() { local gav=$1 rest; rest=${gav#*:}; echo "${rest%%:*}-${gav##*:}.jar"; }
sha_ok() { [[ -f $1 ]] && [[ $(sha1sum "$1" | cut -d' ' -f1) == "$2" ]]; }

missing=()
for entry in "${ARTIFACTS[@]}"; do
  read -r gav sha <<<"$entry"
  sha_ok "$JARS/$(jar_name "$gav")" "$sha" || missing+=("$entry")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  log "delta-spark jars present in $JARS (sha1 match); nothing to fetch"
  exit 0
fi

command -v mvn >/dev/null || die "Maven (mvn) is needed once to fetch the delta-spark jars; install it \
(apt-get install maven), or copy $(for e in "${missing[@]}"; do read -r g _ <<<"$e"; printf '%s ' "$(jar_name "$g")"; done)into $JARS"
mkdir -p "$JARS"
TMP=$(mktemp -d "$JARS/.fetch-XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# One throw-away pom listing exactly the missing jars (no transitive deps: see above), so one
# Maven run fetches them all.
{
  echo '<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>'
  echo '<groupId>towerlake</groupId><artifactId>fetch-jars</artifactId><version>0</version><dependencies>'
  for entry in "${missing[@]}"; do
    read -r gav _ <<<"$entry"
    IFS=: read -r g a v <<<"$gav"
    echo "<dependency><groupId>$g</groupId><artifactId>$a</artifactId><version>$v</version></dependency>"
  done
  echo '</dependencies></project>'
} >"$TMP/pom.xml"

log "fetching ${#missing[@]} jar(s) with Maven into $JARS"
if ! mvn -B -q -C -f "$TMP/pom.xml" "$DEPENDENCY_PLUGIN:copy-dependencies" \
    -DexcludeTransitive=true -DincludeScope=runtime -DoutputDirectory="$TMP/out" >"$TMP/mvn.log" 2>&1; then
  cat "$TMP/mvn.log" >&2
  die "Maven could not fetch the delta-spark jars (log above); without them the delta-rs engine is used"
fi

for entry in "${missing[@]}"; do
  read -r gav sha <<<"$entry"
  name=$(jar_name "$gav")
  [[ -f $TMP/out/$name ]] || die "Maven ran but did not produce $name"
  got=$(sha1sum "$TMP/out/$name" | cut -d' ' -f1)
  [[ $got == "$sha" ]] || die "$name: sha1 $got, expected $sha (pinned in $0): refusing it"
  mv -f "$TMP/out/$name" "$JARS/$name"  # same filesystem: an atomic rename
  log "  $name ($(du -k "$JARS/$name" | cut -f1) KiB, sha1 $sha)"
done
log "done"
