{{/* Names ------------------------------------------------------------------------------ */}}

{{- define "swarmgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-wide prefix of every object; StatefulSet names are checked in checks.yaml. */}}
{{- define "swarmgate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "swarmgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "swarmgate.dhtName" -}}
{{- printf "%s-dht" (include "swarmgate.fullname" .) }}
{{- end }}

{{/* dict "root" $ "group" $g */}}
{{- define "swarmgate.nodeName" -}}
{{- printf "%s-node-%s" (include "swarmgate.fullname" .root) .group.name }}
{{- end }}

{{- define "swarmgate.gatewayName" -}}
{{- printf "%s-gateway" (include "swarmgate.fullname" .) }}
{{- end }}

{{- define "swarmgate.redisName" -}}
{{- printf "%s-redis" (include "swarmgate.fullname" .) }}
{{- end }}

{{- define "swarmgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "swarmgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels: dict "root" $ "component" "node" ["group" "first"] ---------------------------- */}}

{{- define "swarmgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "swarmgate.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- with .group }}
swarmgate/node-group: {{ . }}
{{- end }}
{{- end }}

{{- define "swarmgate.labels" -}}
helm.sh/chart: {{ include "swarmgate.chart" .root }}
{{ include "swarmgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: swarmgate
{{- end }}

{{/* The model and the image --------------------------------------------------------------- */}}

{{- define "swarmgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Hub repository of model.id (`ORG/NAME`, without @REVISION), or "" when model.id is
     `smollm2`, a path or a .gguf file: what `swarmgate` (models/hub.py) reads as a Hub id. */}}
{{- define "swarmgate.hubRepo" -}}
{{- $repo := index (splitList "@" .Values.model.id) 0 }}
{{- if and (regexMatch "^[A-Za-z0-9][-_.A-Za-z0-9]*/[-_.A-Za-z0-9]*[A-Za-z0-9]$" $repo) (not (hasSuffix ".gguf" $repo)) }}
{{- $repo }}
{{- end }}
{{- end }}

{{/* The id clients send: --model-name, else what `swarmgate` derives from --model. */}}
{{- define "swarmgate.modelId" -}}
{{- if .Values.model.name }}
{{- .Values.model.name }}
{{- else if include "swarmgate.hubRepo" . }}
{{- include "swarmgate.hubRepo" . }}
{{- else }}
{{- base (trimSuffix "/" .Values.model.id) | trimSuffix ".gguf" }}
{{- end }}
{{- end }}

{{- define "swarmgate.modelArgs" -}}
- "--model"
- {{ .Values.model.id | quote }}
{{- with .Values.model.name }}
- "--model-name"
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* A number as the CLI reads it: whole ones without an exponent (YAML numbers arrive as
     float64, which would print 1073741824 as 1.073741824e+09). */}}
{{- define "swarmgate.num" -}}
{{- if eq (float64 .) (floor (float64 .)) }}
{{- printf "%d" (int64 .) }}
{{- else }}
{{- printf "%v" . }}
{{- end }}
{{- end }}

{{/* Bootstrap peers ------------------------------------------------------------------------ */}}

{{/* Every --initial-peers entry for nodes and gateways: each DHT replica's HTTP address by
     its stable DNS name, then any peers from values. One per line, for `splitList`. */}}
{{- define "swarmgate.initialPeers" -}}
{{- $peers := list }}
{{- if .Values.dht.enabled }}
{{- $dht := include "swarmgate.dhtName" . }}
{{- range $i := until (int .Values.dht.replicas) }}
{{- $peers = append $peers (printf "http://%s-%d.%s.%s.svc.%s:%d" $dht $i $dht $.Release.Namespace $.Values.clusterDomain (int $.Values.dht.httpPort)) }}
{{- end }}
{{- end }}
{{- $peers = concat $peers .Values.swarm.initialPeers }}
{{- join "\n" $peers }}
{{- end }}

{{- define "swarmgate.initialPeerArgs" -}}
{{- $peers := include "swarmgate.initialPeers" . }}
{{- if $peers -}}
- "--initial-peers"
{{- range splitList "\n" $peers }}
- {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* What every swarm member (dht, node, gateway) shares ------------------------------------- */}}

{{- define "swarmgate.swarmKeyDir" -}}/etc/swarmgate/swarm-key{{- end }}
{{- define "swarmgate.credentialDir" -}}/etc/swarmgate/credential{{- end }}

{{/* Where a role's pods take their swarm membership from, as YAML: a Secret of its own
     (credentials.<role>: a credential issued for that role) when set, else the swarm key's
     (swarmKey.existingSecret), else {} (an open swarm; checks.yaml refuses it otherwise).
     The one place that decides it: a gateway never falls through to the server's Secret.
     dict "root" $ "role" "server"|"gateway" */}}
{{- define "swarmgate.membership" -}}
{{- $credential := get .root.Values.credentials .role }}
{{- if $credential.existingSecret }}
kind: credential
volume: credential
dir: {{ include "swarmgate.credentialDir" .root }}
secret: {{ $credential.existingSecret | quote }}
key: {{ $credential.key | quote }}
{{- else if .root.Values.swarmKey.existingSecret }}
kind: swarmKey
volume: swarm-key
dir: {{ include "swarmgate.swarmKeyDir" .root }}
secret: {{ .root.Values.swarmKey.existingSecret | quote }}
key: {{ .root.Values.swarmKey.key | quote }}
{{- end }}
{{- end }}

{{/* Global options go in env: on the command line they would have to precede the role.
     SWARMGATE_SWARM_KEY names the swarm key or the role's credential: the CLI tells them
     apart. dict "root" $ "role" "server"|"gateway" */}}
{{- define "swarmgate.memberEnv" -}}
{{- $root := .root }}
{{- $m := fromYaml (include "swarmgate.membership" .) -}}
- name: SWARMGATE_LOG_LEVEL
  value: {{ $root.Values.logging.level | quote }}
- name: SWARMGATE_LOG_FORMAT
  value: {{ $root.Values.logging.format | quote }}
- name: SWARMGATE_JOIN_TIMEOUT
  value: {{ include "swarmgate.num" $root.Values.swarm.joinTimeout | quote }}
{{- with $root.Values.swarm.namespace }}
- name: SWARMGATE_NAMESPACE
  value: {{ . | quote }}
{{- end }}
{{- if $m }}
- name: SWARMGATE_SWARM_KEY
  value: {{ printf "%s/%s" $m.dir $m.key | quote }}
{{- end }}
{{- end }}

{{/* dict "root" $ "role" "server"|"gateway" */}}
{{- define "swarmgate.memberVolumes" -}}
{{- $m := fromYaml (include "swarmgate.membership" .) -}}
- name: tmp
  emptyDir: {}
- name: home-cache
  emptyDir: {}
{{- if $m }}
- name: {{ $m.volume }}
  secret:
    secretName: {{ $m.secret | quote }}
    defaultMode: 0400
    items:
      - key: {{ $m.key | quote }}
        path: {{ $m.key | quote }}
{{- end }}
{{- end }}

{{/* dict "root" $ "role" "server"|"gateway" */}}
{{- define "swarmgate.memberVolumeMounts" -}}
{{- $m := fromYaml (include "swarmgate.membership" .) -}}
- name: tmp
  mountPath: /tmp
- name: home-cache
  mountPath: /home/swarmgate/.cache
{{- if $m }}
- name: {{ $m.volume }}
  mountPath: {{ $m.dir }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "swarmgate.modelVolume" -}}
{{- with .Values.model.volume -}}
- name: model
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "swarmgate.modelVolumeMount" -}}
{{- if .Values.model.volume -}}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* What nodes and gateways need to fetch a Hub model: the cache, the revision, the token
     (from its Secret, never a value). */}}
{{- define "swarmgate.hubEnv" -}}
- name: HF_HOME
  value: {{ .Values.hfCache.mountPath | quote }}
{{- with .Values.model.revision }}
- name: SWARMGATE_REVISION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.model.hfToken.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.model.hfToken.key }}
{{- end }}
{{- end }}

{{/* The Hugging Face cache: "claim" (a volumeClaimTemplate per pod, nodes only),
     "existing" (persistence.existingClaim) or "emptyDir".
     dict "root" $ "perPodClaims" true|false */}}
{{- define "swarmgate.hfCacheKind" -}}
{{- $p := .root.Values.hfCache.persistence }}
{{- if and $p.enabled $p.existingClaim }}existing
{{- else if and $p.enabled .perPodClaims }}claim
{{- else }}emptyDir
{{- end }}
{{- end }}

{{- define "swarmgate.hfCacheVolume" -}}
{{- $kind := include "swarmgate.hfCacheKind" . }}
{{- if eq $kind "existing" -}}
- name: hf-cache
  persistentVolumeClaim:
    claimName: {{ .root.Values.hfCache.persistence.existingClaim }}
{{- else if eq $kind "emptyDir" -}}
- name: hf-cache
  emptyDir: {}
{{- end }}
{{- end }}

{{- define "swarmgate.hfCacheVolumeMount" -}}
- name: hf-cache
  mountPath: {{ .Values.hfCache.mountPath }}
{{- end }}

{{- define "swarmgate.podIpEnv" -}}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- end }}

{{/* The pod spec fields every swarmgate pod shares: no API token, no service links (a Service
     named e.g. `swarmgate` would inject SWARMGATE_PORT=tcp://..., which the CLI reads). */}}
{{- define "swarmgate.podCommon" -}}
serviceAccountName: {{ include "swarmgate.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Scheduling fields of a role's settings ($s), and its RuntimeClass (e.g. nvidia). */}}
{{- define "swarmgate.scheduling" -}}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* A volumeClaimTemplate (a peer identity, the Hugging Face cache):
     dict "name" "identity" "persistence" $p */}}
{{- define "swarmgate.claimTemplate" -}}
- metadata:
    name: {{ .name }}
  spec:
    accessModes:
      {{- toYaml .persistence.accessModes | nindent 6 }}
    {{- with .persistence.storageClass }}
    storageClassName: {{ . | quote }}
    {{- end }}
    resources:
      requests:
        storage: {{ .persistence.size | quote }}
{{- end }}

{{/* Prometheus scrape annotations: dict "root" $ "port" 9090 */}}
{{- define "swarmgate.scrapeAnnotations" -}}
{{- if .root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/* Node groups with nodeDefaults under each, as YAML {"groups": [...]} (templates return
     text). Not sprig's merge: it skips "empty" values, so a group could not set replicas: 0
     or persistence.enabled: false over a default. */}}
{{- define "swarmgate.nodeGroups" -}}
{{- $groups := list }}
{{- range .Values.nodes }}
{{- $groups = append $groups (fromYaml (include "swarmgate.merge" (dict "base" $.Values.nodeDefaults "over" .))) }}
{{- end }}
{{- toYaml (dict "groups" $groups) }}
{{- end }}

{{/* dict "base" $map "over" $map: over's keys win, maps merge key by key, lists replace. */}}
{{- define "swarmgate.merge" -}}
{{- $out := deepCopy .base }}
{{- range $key, $value := .over }}
{{- if and (kindIs "map" $value) (kindIs "map" (get $out $key)) }}
{{- $_ := set $out $key (fromYaml (include "swarmgate.merge" (dict "base" (get $out $key) "over" $value))) }}
{{- else }}
{{- $_ := set $out $key $value }}
{{- end }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* A group's terminationGracePeriodSeconds: set, or its drain timeout plus 30 s. */}}
{{- define "swarmgate.nodeGrace" -}}
{{- if kindIs "invalid" .terminationGracePeriodSeconds }}
{{- add (ceil (float64 .drainTimeout) | int64) 30 }}
{{- else }}
{{- .terminationGracePeriodSeconds | int64 }}
{{- end }}
{{- end }}

{{/* Where gateways find Redis: "url" (plain value), "secret" or "" (none). */}}
{{- define "swarmgate.redisMode" -}}
{{- if .Values.redis.enabled }}bundled
{{- else if .Values.redis.existingSecret }}secret
{{- else if .Values.redis.url }}url
{{- end }}
{{- end }}

{{/* An IntOrString value (PDB budgets): "50%" stays a string, 1 stays a number. */}}
{{- define "swarmgate.intOrString" -}}
{{- if kindIs "string" . }}{{ . | quote }}{{ else }}{{ int64 . }}{{ end }}
{{- end }}
