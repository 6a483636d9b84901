{{/*
Names, labels, images and the Redis connection shared by the templates.
*/}}

{{- define "mailroute.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* At most 46 characters, so that every component name stays a distinct DNS label: the longest
     Service suffix is "-redis-headless" (63 - 15 = 48), and the Redis StatefulSet's name plus the
     11-character revision hash of its pods' controller-revision-hash label must fit in 63. */}}
{{- define "mailroute.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 46 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 46 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 46 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mailroute.operator.fullname" -}}
{{- printf "%s-operator" (include "mailroute.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mailroute.relay.fullname" -}}
{{- printf "%s-relay" (include "mailroute.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mailroute.relayAdmin.fullname" -}}
{{- printf "%s-relay-admin" (include "mailroute.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mailroute.redis.fullname" -}}
{{- printf "%s-redis" (include "mailroute.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels; "component" is set by the caller. */}}
{{- define "mailroute.labels" -}}
app.kubernetes.io/name: {{ include "mailroute.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: mailroute
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
{{- if .ctx.Values.helmLabels }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "mailroute.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailroute.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "mailroute.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "mailroute.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mailroute.relay.serviceAccountName" -}}
{{- if .Values.relay.serviceAccount.create }}
{{- default (include "mailroute.relay.fullname" .) .Values.relay.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.relay.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Image reference for the operator or relay: pass (dict "ctx" $ "image" .Values.relay.image).
     The appVersion tag names an image only in a published chart (Chart annotation
     mailroute.io/images-published "true", set by scripts/release_chart.py when the release
     workflow packages the chart after pushing the images). From the source tree the user names
     the images (a tag or digest), or the install fails here instead of in ImagePullBackOff. */}}
{{- define "mailroute.image" -}}
{{- $repo := printf "%s/%s" (trimSuffix "/" .ctx.Values.image.registry) .image.repository }}
{{- $tag := .image.tag | default .ctx.Values.image.tag }}
{{- $published := eq (index (.ctx.Chart.Annotations | default dict) "mailroute.io/images-published" | default "false") "true" }}
{{- if and (not .image.digest) (not $tag) (not $published) }}
{{- fail (include "mailroute.unpublishedImagesMessage" (dict "ctx" .ctx "repo" $repo)) }}
{{- end }}
{{- if .image.digest }}
{{- printf "%s@%s" $repo .image.digest }}
{{- else }}
{{- printf "%s:%s" $repo ($tag | default .ctx.Chart.AppVersion) }}
{{- end }}
{{- end }}

{{- define "mailroute.unpublishedImagesMessage" -}}
{{- $registry := trimSuffix "/" .ctx.Values.image.registry -}}
unpublished images: this chart comes from the source tree (appVersion {{ .ctx.Chart.AppVersion }}), so {{ .repo }}:{{ .ctx.Chart.AppVersion }} may not exist and the pods would end in ImagePullBackOff.
Either install a published release of the chart:
  helm install mailroute oci://{{ $registry }}/charts/mailroute --version <version>
or build and push the images (from the repository root, Docker with buildx), then name their tag:
  docker buildx build --platform linux/amd64,linux/arm64 --target relay -t <registry>/{{ .ctx.Values.relay.image.repository }}:<tag> --push .
  docker buildx build --platform linux/amd64,linux/arm64 --target operator -t <registry>/{{ .ctx.Values.operator.image.repository }}:<tag> --push .
  helm install mailroute charts/mailroute --set image.registry=<registry> --set image.tag=<tag>
(or relay.image.digest / operator.image.digest; see the chart README, "Images").
{{- end }}

{{- define "mailroute.redis.image" -}}
{{- $img := .Values.redis.image }}
{{- if $img.digest }}
{{- printf "%s:%s@%s" $img.repository $img.tag $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository $img.tag }}
{{- end }}
{{- end }}

{{- define "mailroute.adminTokenSecretName" -}}
{{- if .Values.relay.adminToken.existingSecret }}
{{- .Values.relay.adminToken.existingSecret }}
{{- else }}
{{- printf "%s-admin-token" (include "mailroute.fullname" .) }}
{{- end }}
{{- end }}

{{/* True when the relays get an admin token from a Secret. */}}
{{- define "mailroute.adminTokenEnabled" -}}
{{- if or .Values.relay.adminToken.existingSecret .Values.relay.adminToken.create }}true{{ end }}
{{- end }}

{{- define "mailroute.tlsSecretName" -}}
{{- default (printf "%s-relay-tls" (include "mailroute.fullname" .)) .Values.relay.tls.secretName }}
{{- end }}

{{/* Secret name and key of the Redis password, or empty when Redis has none. */}}
{{- define "mailroute.redis.passwordSecret" -}}
{{- if .Values.redis.enabled }}
{{- if .Values.redis.auth.enabled }}
{{- default (include "mailroute.redis.fullname" .) .Values.redis.auth.existingSecret }}
{{- end }}
{{- else }}
{{- .Values.externalRedis.existingSecret }}
{{- end }}
{{- end }}

{{- define "mailroute.redis.passwordKey" -}}
{{- if .Values.redis.enabled }}
{{- .Values.redis.auth.passwordKey }}
{{- else }}
{{- .Values.externalRedis.passwordKey }}
{{- end }}
{{- end }}

{{/*
Parsed Redis endpoint as a dict: scheme, user, host (name only), port, db, tls ("true"/"false"),
cluster ("true"/"false"; a cluster has hosts, the comma-separated host:port seeds, instead).
In-cluster Redis is reached by its Service name; KEDA runs in its own namespace and gets the
fully qualified name (see mailroute.redis.kedaAddress).
*/}}
{{- define "mailroute.redis.endpoint" -}}
{{- if .Values.redis.enabled }}
{{- dict "scheme" "redis" "user" "" "host" (include "mailroute.redis.fullname" .) "port" "6379" "db" "0" "tls" "false" "cluster" "false" | toJson }}
{{- else }}
{{- if not .Values.externalRedis.url }}
{{- fail "redis.enabled=false needs externalRedis.url (e.g. rediss://redis.example:6380/0)" }}
{{- end }}
{{- $scheme := regexFind "^[a-z+]+" .Values.externalRedis.url }}
{{- if has $scheme (list "redis+cluster" "rediss+cluster") }}
{{- /* Redis Cluster: user@host:port,host:port — the seeds; url parsing would reject the list. */}}
{{- $rest := trimSuffix "/" (trimPrefix (printf "%s://" $scheme) .Values.externalRedis.url) }}
{{- $user := "" }}
{{- $hosts := $rest }}
{{- if contains "@" $rest }}
{{- $user = first (splitList "@" $rest) }}
{{- $hosts = last (splitList "@" $rest) }}
{{- end }}
{{- if contains ":" $user }}
{{- fail "externalRedis.url must not contain a password: put it in externalRedis.existingSecret" }}
{{- end }}
{{- if not (regexMatch "^[^:@/,\\s]+:[0-9]+(,[^:@/,\\s]+:[0-9]+)*$" $hosts) }}
{{- fail (printf "externalRedis.url: a cluster URL lists host:port seeds separated by commas, got %q" .Values.externalRedis.url) }}
{{- end }}
{{- dict "scheme" $scheme "user" $user "hosts" $hosts "cluster" "true" "db" "0" "tls" (ternary "true" "false" (eq $scheme "rediss+cluster")) | toJson }}
{{- else }}
{{- $u := urlParse .Values.externalRedis.url }}
{{- if not (has $u.scheme (list "redis" "rediss")) }}
{{- fail (printf "externalRedis.url must start with redis://, rediss://, redis+cluster:// or rediss+cluster://, got %q" .Values.externalRedis.url) }}
{{- end }}
{{- if contains ":" ($u.userinfo | default "") }}
{{- fail "externalRedis.url must not contain a password: put it in externalRedis.existingSecret" }}
{{- end }}
{{- $hostport := splitList ":" $u.host }}
{{- $port := ternary "6380" "6379" (eq $u.scheme "rediss") }}
{{- if gt (len $hostport) 1 }}{{ $port = last $hostport }}{{ end }}
{{- $db := trimPrefix "/" ($u.path | default "") | default "0" }}
{{- dict "scheme" $u.scheme "user" ($u.userinfo | default "") "host" (first $hostport) "port" $port "db" $db "tls" (ternary "true" "false" (eq $u.scheme "rediss")) "cluster" "false" | toJson }}
{{- end }}
{{- end }}
{{- end }}

{{/* Queue URL for --queue; $(REDIS_PASSWORD) is expanded by Kubernetes from the env var. */}}
{{- define "mailroute.redis.queueUrl" -}}
{{- $e := include "mailroute.redis.endpoint" . | fromJson }}
{{- $auth := "" }}
{{- if include "mailroute.redis.passwordSecret" . }}
{{- $auth = printf "%s:$(REDIS_PASSWORD)@" $e.user }}
{{- else if $e.user }}
{{- $auth = printf "%s@" $e.user }}
{{- end }}
{{- if eq $e.cluster "true" }}
{{- printf "%s://%s%s" $e.scheme $auth $e.hosts }}
{{- else }}
{{- printf "%s://%s%s:%s/%s" $e.scheme $auth $e.host $e.port $e.db }}
{{- end }}
{{- end }}

{{- define "mailroute.redis.kedaAddress" -}}
{{- $e := include "mailroute.redis.endpoint" . | fromJson }}
{{- if .Values.redis.enabled }}
{{- printf "%s.%s.svc:%s" $e.host .Release.Namespace $e.port }}
{{- else }}
{{- printf "%s:%s" $e.host $e.port }}
{{- end }}
{{- end }}

{{/* Namespace peers for a NetworkPolicy "from": pass (dict "names" list "selector" map). */}}
{{- define "mailroute.namespacePeers" -}}
{{- if .names }}
- namespaceSelector:
    matchExpressions:
      - key: kubernetes.io/metadata.name
        operator: In
        values:
          {{- toYaml .names | nindent 10 }}
{{- end }}
{{- if .selector }}
- namespaceSelector:
    {{- toYaml .selector | nindent 4 }}
{{- end }}
{{- end }}

{{/*
Value of a chart-generated secret (admin token, Redis password): the existing Secret's value when
the release is upgraded (lookup), else a random one. Memoized in .Values so that the Secret and
the checksum annotations of the pods see the same value within one render.
Pass (dict "ctx" $ "name" secretName "key" key "memo" memoKey).
*/}}
{{- define "mailroute.generatedSecretValue" -}}
{{- $memo := .ctx.Values._generated | default dict }}
{{- if not (hasKey $memo .memo) }}
{{- $value := randAlphaNum 40 }}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .name }}
{{- if and $existing (hasKey ($existing.data | default dict) .key) }}
{{- $value = index $existing.data .key | b64dec }}
{{- end }}
{{- $_ := set $memo .memo $value }}
{{- $_ := set .ctx.Values "_generated" $memo }}
{{- end }}
{{- index $memo .memo }}
{{- end }}

{{/* Hash of a Secret that exists in the cluster (empty offline): rotating it rolls the pods on upgrade. */}}
{{- define "mailroute.existingSecretHash" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .name }}
{{- if $existing }}{{ toJson ($existing.data | default dict) | sha256sum }}{{ end }}
{{- end }}

{{- define "mailroute.adminTokenValue" -}}
{{- include "mailroute.generatedSecretValue" (dict "ctx" . "name" (include "mailroute.adminTokenSecretName" .) "key" .Values.relay.adminToken.key "memo" "adminToken") }}
{{- end }}

{{- define "mailroute.redisPasswordValue" -}}
{{- include "mailroute.generatedSecretValue" (dict "ctx" . "name" (include "mailroute.redis.fullname" .) "key" .Values.redis.auth.passwordKey "memo" "redisPassword") }}
{{- end }}

{{/* Identity of the admin token the pods read from their environment at start-up. */}}
{{- define "mailroute.adminTokenIdentity" -}}
{{- if .Values.relay.adminToken.existingSecret }}
{{- include "mailroute.existingSecretHash" (dict "ctx" . "name" .Values.relay.adminToken.existingSecret) }}
{{- else if .Values.relay.adminToken.create }}
{{- include "mailroute.adminTokenValue" . }}
{{- end }}
{{- end }}

{{/* Checksum over everything secret the relay pods read at start-up (env vars, TLS files). */}}
{{- define "mailroute.relay.secretsChecksum" -}}
{{- $parts := list (include "mailroute.adminTokenIdentity" .) }}
{{- $pw := include "mailroute.redis.passwordSecret" . }}
{{- if and .Values.redis.enabled .Values.redis.auth.enabled (not .Values.redis.auth.existingSecret) }}
{{- $parts = append $parts (include "mailroute.redisPasswordValue" .) }}
{{- else if $pw }}
{{- $parts = append $parts (include "mailroute.existingSecretHash" (dict "ctx" . "name" $pw)) }}
{{- end }}
{{- if .Values.relay.tls.enabled }}
{{- $parts = append $parts (include "mailroute.existingSecretHash" (dict "ctx" . "name" (include "mailroute.tlsSecretName" .))) }}
{{- end }}
{{- join "\n" $parts | sha256sum }}
{{- end }}

{{/* redis.conf of the in-cluster Redis: durable queue settings. */}}
{{- define "mailroute.redis.conf" -}}
# Written by the mailroute chart. The queue must never lose an acknowledged message.
# Both families where the pod has them ("-" : an absent IPv6 stack is not an error).
bind * -::*
port 6379
protected-mode no
dir /data
# Durability: every write is appended to the AOF and fsynced before Redis replies, so the relay's
# 250 (sent only after Redis acknowledged the message) means the message is on disk.
appendonly yes
appendfsync {{ .Values.redis.appendfsync }}
appenddirname appendonlydir
aof-use-rdb-preamble yes
# Rewrites fork Redis and stall fsyncs; at ~12 KB of AOF per message the 64mb default rewrote
# every few seconds under load and drove the accept p99 (bench/results/2026-11-23-vm-analysis.md).
auto-aof-rewrite-percentage 100
auto-aof-rewrite-min-size 1gb
# No RDB snapshots: the AOF is the persistence.
save ""
# A queue must never evict: when full, writes fail and relays answer 4xx (clients retry).
maxmemory-policy noeviction
# Below the container's memory limit, so that a full queue answers 4xx at the door instead of
# the cgroup killing Redis (which then could not replay its AOF within the same limit).
maxmemory {{ include "mailroute.redis.maxmemory" . }}
{{- with .Values.redis.extraConfig }}
{{ . }}
{{- end }}
{{- end }}

{{/* Bytes of a Kubernetes memory quantity such as 1Gi, 512Mi, 2G or 1073741824. */}}
{{- define "mailroute.quantityBytes" -}}
{{- $q := toString . }}
{{- $num := regexFind "^[0-9]+" $q }}
{{- $unit := trimPrefix $num $q }}
{{- $mult := get (dict "" 1 "k" 1000 "K" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776) $unit }}
{{- if or (not $num) (not $mult) }}
{{- fail (printf "cannot read the memory quantity %q (use an integer with Ki, Mi, Gi, Ti, k, M, G or T)" $q) }}
{{- end }}
{{- mul (int64 $num) (int64 $mult) }}
{{- end }}

{{/* Redis maxmemory: redis.maxmemory, else redis.maxmemoryPercent of the memory limit. */}}
{{- define "mailroute.redis.maxmemory" -}}
{{- $rd := .Values.redis }}
{{- if $rd.maxmemory }}
{{- $rd.maxmemory }}
{{- else }}
{{- $limit := dig "limits" "memory" "" $rd.resources }}
{{- if not $limit }}
{{- fail "redis.resources.limits.memory is required (maxmemory is derived from it), or set redis.maxmemory" }}
{{- end }}
{{- div (mul (include "mailroute.quantityBytes" $limit | int64) (int64 $rd.maxmemoryPercent)) 100 }}
{{- end }}
{{- end }}

{{/* Wildcard address of the listeners for .Values.ipFamily. */}}
{{- define "mailroute.anyAddress" -}}
{{- if eq .Values.ipFamily "IPv4" }}0.0.0.0{{ else }}[::]{{ end }}
{{- end }}
