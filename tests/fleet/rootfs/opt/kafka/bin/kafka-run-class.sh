#!/bin/sh
# A thin stand-in for the distribution's kafka-run-class.sh: same name and
# calling convention (CLASS ARGS...), with the jars Maven assembled in libs/.
base=$(dirname "$(dirname "$(readlink -f "$0")")")
# Word splitting of the *_OPTS variables is intended, as in the original.
# shellcheck disable=SC2086
exec java ${KAFKA_HEAP_OPTS:--Xmx256m} ${KAFKA_JVM_PERFORMANCE_OPTS:--XX:+UseSerialGC} \
  -Dlog4j2.configurationFile="${KAFKA_LOG4J_CONFIG:-$base/config/log4j2-tools.properties}" \
  ${KAFKA_OPTS:-} -cp "$base/libs/*" "$@"
