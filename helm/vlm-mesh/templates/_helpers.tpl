{{/* Chart name, overridable. */}}
{{- define "vlm-mesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>" (or the release alone when it already contains the chart name).
Kept to 45 characters so "<fullname>-projector-tls" and friends stay valid names. */}}
{{- define "vlm-mesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "vlm-mesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component. Call with (dict "root" $ "component" "encoder"). */}}
{{- define "vlm-mesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vlm-mesh.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component. Call with (dict "root" $ "component" "encoder"). */}}
{{- define "vlm-mesh.labels" -}}
helm.sh/chart: {{ include "vlm-mesh.chart" .root }}
{{ include "vlm-mesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: vlm-mesh
{{- end }}

{{/* Name of a component's objects (Deployment, Service, HPA, PDB). */}}
{{- define "vlm-mesh.componentName" -}}
{{ include "vlm-mesh.fullname" .root }}-{{ .component }}
{{- end }}

{{- define "vlm-mesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vlm-mesh.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "vlm-mesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The Secret with a component's certificate. Call with (dict "root" $ "component" "encoder"). */}}
{{- define "vlm-mesh.tlsSecretName" -}}
{{- $explicit := get .root.Values.tls.secretNames .component }}
{{- if and $explicit (not .root.Values.certManager.enabled) }}
{{- $explicit }}
{{- else }}
{{- include "vlm-mesh.componentName" . }}-tls
{{- end }}
{{- end }}

{{/* The URI SAN that names a certificate's role, as the services read it
(vlm_net::roles::ROLE_URI_PREFIX). Call with the component's name. */}}
{{- define "vlm-mesh.roleUri" -}}
spiffe://vlm-mesh/{{ . }}
{{- end }}

{{/* DNS names a component's Service answers to; its certificate carries all of them. */}}
{{- define "vlm-mesh.serviceDnsNames" -}}
{{- $svc := include "vlm-mesh.componentName" . }}
{{- $ns := .root.Release.Namespace }}
- {{ $svc }}
- {{ $svc }}.{{ $ns }}
- {{ $svc }}.{{ $ns }}.svc
- {{ $svc }}.{{ $ns }}.svc.{{ .root.Values.clusterDomain }}
{{- end }}

{{/* URL the gateway dials for an internal stage: the headless Service's short name, which is
also the name the gateway verifies in the stage's certificate. */}}
{{- define "vlm-mesh.stageUrl" -}}
dns://{{ include "vlm-mesh.componentName" . }}:{{ .root.Values.ports.grpc }}
{{- end }}

{{/* Whether the bundled Redis is deployed. */}}
{{- define "vlm-mesh.bundledRedis" -}}
{{- if and .Values.cache.enabled .Values.redis.bundled.enabled (not .Values.redis.externalUrl) (not .Values.redis.existingSecret.name) }}true{{ end }}
{{- end }}

{{/* The Secret holding the bundled Redis's password. */}}
{{- define "vlm-mesh.redisAuthSecret" -}}
{{- .Values.redis.bundled.auth.existingSecret | default (printf "%s-redis-auth" (include "vlm-mesh.fullname" .)) }}
{{- end }}

{{/* The Secret holding the gateways' cache MAC key. */}}
{{- define "vlm-mesh.cacheSecret" -}}
{{- .Values.cache.secret.existingSecret | default (printf "%s-cache-secret" (include "vlm-mesh.fullname" .)) }}
{{- end }}

{{/* Where gateways mount it. */}}
{{- define "vlm-mesh.cacheSecretDir" -}}
/etc/vlm-mesh/cache-secret
{{- end }}

{{/* OTLP endpoint for every component, or empty. */}}
{{- define "vlm-mesh.otlpEndpoint" -}}
{{- if .Values.otel.endpoint }}
{{- .Values.otel.endpoint }}
{{- else if .Values.jaeger.enabled }}
{{- printf "http://%s-jaeger:4317" (include "vlm-mesh.fullname" .) }}
{{- end }}
{{- end }}

{{/* The grpc.health.v1 service name a stage reports SERVING once loaded. */}}
{{- define "vlm-mesh.grpcService" -}}
{{- printf "vlm.v1.%s" (title .) }}
{{- end }}

{{/* Host part of a listen address: IPv6 literals get brackets. */}}
{{- define "vlm-mesh.hostPort" -}}
{{- if contains ":" . }}[{{ . }}]{{ else }}{{ . }}{{ end }}
{{- end }}

{{/* The Secret with the certificate of the gateway's public ports, or empty (the mesh one). */}}
{{- define "vlm-mesh.publicTlsSecret" -}}
{{- $p := .Values.gateway.publicTls }}
{{- if $p.secretName }}
{{- $p.secretName }}
{{- else if $p.certificate.enabled }}
{{- include "vlm-mesh.fullname" . }}-gateway-public-tls
{{- end }}
{{- end }}

{{/* Where an Ingress or HTTPRoute sends the OpenAI API: (dict "name" Service "port" port-name).
Call with (list $ backend), backend "plaintext" or "tls". */}}
{{- define "vlm-mesh.httpBackend" -}}
{{- $root := index . 0 }}
{{- $gw := include "vlm-mesh.componentName" (dict "root" $root "component" "gateway") }}
{{- if eq (index . 1) "plaintext" }}
{{- dict "name" (printf "%s-http" $gw) "port" (int $root.Values.gateway.httpPlaintext.port) | toJson }}
{{- else }}
{{- dict "name" $gw "port" (int $root.Values.gateway.openai.servicePort) | toJson }}
{{- end }}
{{- end }}

{{/* What model.download fetches for a stage, as JSON {files, prefixes, exclude}: the files the
stage reads by name, and the tensor name prefixes its loader accepts (shared/model/src/checkpoint.rs,
PartKind::aliases: the Hub's, transformers 5's and GLM-4.1V's spellings; helm/tests checks that
they match). Call with the stage's name. */}}
{{- define "vlm-mesh.downloadPlan" -}}
{{- if eq . "encoder" }}
{{- dict
  "files" (list "config.json" "preprocessor_config.json" "processor_config.json")
  "prefixes" (list "vision_tower." "model.vision_tower." "visual." "model.visual.")
  "exclude" (list "visual.merger." "model.visual.merger.") | toJson }}
{{- else if eq . "projector" }}
{{- dict
  "files" (list "config.json")
  "prefixes" (list "multi_modal_projector." "model.multi_modal_projector." "image_newline" "model.image_newline" "visual.merger." "model.visual.merger.")
  "exclude" (list) | toJson }}
{{- else if eq . "decoder" }}
{{- dict
  "files" (list "config.json" "generation_config.json" "tokenizer.json" "tokenizer_config.json" "chat_template.jinja" "chat_template.json")
  "prefixes" (list "language_model." "model.language_model." "lm_head.")
  "exclude" (list) | toJson }}
{{- else }}
{{- fail (printf "no download plan for %s" .) }}
{{- end }}
{{- end }}

{{/* Combinations the schema cannot express; fails the render with the reason. */}}
{{- define "vlm-mesh.checkValues" -}}
{{- $ports := dict }}
{{- $named := list (list "ports.grpc" .Values.ports.grpc) (list "ports.health" .Values.ports.health) }}
{{- if .Values.metrics.enabled }}
{{- $named = append $named (list "ports.metrics" .Values.ports.metrics) }}
{{- end }}
{{- if .Values.gateway.openai.enabled }}
{{- $named = append $named (list "gateway.openai.port" .Values.gateway.openai.port) }}
{{- end }}
{{- if .Values.gateway.httpPlaintext.enabled }}
{{- $named = append $named (list "gateway.httpPlaintext.port" .Values.gateway.httpPlaintext.port) }}
{{- end }}
{{- range $named }}
{{- $key := toString (int (index . 1)) }}
{{- if hasKey $ports $key }}
{{- fail (printf "%s and %s are both %s: every container port must differ" (get $ports $key) (index . 0) $key) }}
{{- end }}
{{- $_ := set $ports $key (index . 0) }}
{{- end }}
{{- if and .Values.gateway.openai.enabled (eq (int .Values.gateway.openai.servicePort) (int .Values.gateway.service.port)) }}
{{- fail (printf "gateway.openai.servicePort and gateway.service.port are both %v" .Values.gateway.service.port) }}
{{- end }}
{{- if and .Values.gateway.openai.allowPrivateImageUrls (not .Values.gateway.openai.allowImageUrls) }}
{{- fail "gateway.openai.allowPrivateImageUrls needs gateway.openai.allowImageUrls" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled" }}
{{- end }}
{{- $pub := .Values.gateway.publicTls }}
{{- if and (include "vlm-mesh.publicTlsSecret" .) .Values.gateway.plaintext }}
{{- fail "gateway.publicTls needs TLS on the public ports: gateway.plaintext is true" }}
{{- end }}
{{- if $pub.certificate.enabled }}
{{- if not ($pub.certificate.issuerRef).name }}
{{- fail "gateway.publicTls.certificate.enabled needs gateway.publicTls.certificate.issuerRef.name (e.g. an ACME ClusterIssuer)" }}
{{- end }}
{{- if not $pub.certificate.dnsNames }}
{{- fail "gateway.publicTls.certificate.enabled needs gateway.publicTls.certificate.dnsNames (the gateway's public names)" }}
{{- end }}
{{- end }}
{{- range $what := list (list "ingress" .Values.ingress.enabled .Values.ingress.backend) (list "gatewayApi.httpRoute" .Values.gatewayApi.httpRoute.enabled .Values.gatewayApi.httpRoute.backend) }}
{{- if index $what 1 }}
{{- if and (eq (index $what 2) "plaintext") (not $.Values.gateway.httpPlaintext.enabled) }}
{{- fail (printf "%s.backend plaintext needs gateway.httpPlaintext.enabled" (index $what 0)) }}
{{- end }}
{{- if and (eq (index $what 2) "tls") (not $.Values.gateway.openai.enabled) }}
{{- fail (printf "%s.backend tls needs gateway.openai.enabled" (index $what 0)) }}
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.model.download }}
{{- if .enabled }}
{{- if not .image }}
{{- fail "model.download.enabled needs model.download.image: an image with Python 3 and huggingface_hub (docs/kubernetes.md, \"Downloading the weights\")" }}
{{- end }}
{{- if not .repo }}
{{- fail "model.download.enabled needs model.download.repo (e.g. llava-hf/llava-1.5-7b-hf)" }}
{{- end }}
{{- if not (hasPrefix (printf "%s/" (trimSuffix "/" $.Values.model.mountPath)) $.Values.model.dir) }}
{{- fail (printf "model.download writes to model.dir (%s), which must be under model.mountPath (%s)" $.Values.model.dir $.Values.model.mountPath) }}
{{- end }}
{{- if not (or (hasKey $.Values.model.volume "emptyDir") (hasKey $.Values.model.volume "ephemeral")) }}
{{- fail "model.download needs a model.volume of the pod's own (emptyDir or ephemeral): every pod's init container writes into it, so pods must not share the directory (a shared PVC: fill it once with the whole checkpoint and leave model.download off)" }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (or .Values.gatewayApi.httpRoute.enabled .Values.gatewayApi.grpcRoute.enabled) (not .Values.gatewayApi.parentRefs) }}
{{- fail "gatewayApi routes need gatewayApi.parentRefs (the Gateway they attach to)" }}
{{- end }}
{{- end }}
