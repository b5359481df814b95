/**
 * `/metrics` counters of usage recorded on this replica: `maestro_tokens_total{client,model,direction}`
 * and `maestro_gpu_seconds_total{assignment}`. Names come from clients: past LABEL_LIMIT distinct
 * values of a label, new ones count as `other` (as the request metrics do for models,
 * which are labelled by their matching key here too: `llama3:latest` as `llama3`).
 */
import { Counter, type Registry } from 'prom-client'
import { modelKey } from '../fleet/model-name.js'
import type { normaliseEntry } from './usage-ledger.js'

const LABEL_LIMIT = 200

function boundedLabel (): (value: string) => string {
  const seen = new Set<string>()
  return (value) => {
    if (seen.has(value)) return value
    if (seen.size >= LABEL_LIMIT) return 'other'
    seen.add(value)
    return value
  }
}

/** Registers the counters in `registry`; the function it answers counts one recorded entry. */
export function usageMetrics (registry: Registry): (entry: ReturnType<typeof normaliseEntry>) => void {
  const tokens = new Counter({
    name: 'maestro_tokens_total',
    help: 'Tokens of the requests this replica answered, by client (API key name, else address), model and direction (prompt: the whole prompt, cached part included; output)',
    labelNames: ['client', 'model', 'direction'] as const,
    registers: [registry]
  })
  const gpuSeconds = new Counter({
    name: 'maestro_gpu_seconds_total',
    help: 'Seconds the requests this replica answered held a GPU lease, by assignment',
    labelNames: ['assignment'] as const,
    registers: [registry]
  })
  const client = boundedLabel()
  const model = boundedLabel()
  const assignment = boundedLabel()
  return (entry) => {
    const { promptTokens, outputTokens, gpuSeconds: held } = entry.counts
    if (promptTokens > 0 || outputTokens > 0) {
      const c = client(entry.client)
      const m = model(modelKey(entry.model))
      if (promptTokens > 0) tokens.inc({ client: c, model: m, direction: 'prompt' }, promptTokens)
      if (outputTokens > 0) tokens.inc({ client: c, model: m, direction: 'output' }, outputTokens)
    }
    if (held > 0) gpuSeconds.inc({ assignment: assignment(entry.assignment) }, held)
  }
}
