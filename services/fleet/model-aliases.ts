/**
 * Model aliases and fallbacks (CONTRACT 17): an alias is another name of one model (leased and
 * forwarded as that model); a model's fallbacks are the models, in order, that serve its requests
 * when it cannot. The rules a set of them keeps, shared by the admin API (services/fleet/fleet-rules.ts),
 * the inventory file and the tables (services/fleet/inventory.ts). No Fastify here.
 */
import { modelKey } from './model-name.js'

export interface ModelAlias { alias: string, model: string }
export interface ModelFallbacks { model: string, fallbacks: string[] }

/** Most fallbacks a model may name. */
export const FALLBACKS_MAX = 16

/** What is wrong with an alias or a fallback list: 409 for a name taken, 400 otherwise. */
export interface AliasProblem { status: 400 | 409, field: string, message: string }

/** Whether a name is a model (listed, or served by an assignment): `isModel(modelKey(name))`. */
export type IsModel = (key: string) => boolean

/** An alias's problem against the models and the other aliases (`others` without it), or undefined. */
export function aliasProblem (entry: ModelAlias, others: readonly ModelAlias[], isModel: IsModel): AliasProblem | undefined {
  const key = modelKey(entry.alias)
  if (isModel(key)) return { status: 409, field: 'alias', message: `${JSON.stringify(entry.alias)} is the name of a model: an alias must be a name of its own` }
  const twin = others.find((a) => modelKey(a.alias) === key)
  if (twin !== undefined) return { status: 409, field: 'alias', message: `${JSON.stringify(twin.alias)} is already an alias (of ${JSON.stringify(twin.model)})` }
  const target = modelKey(entry.model)
  const chained = others.find((a) => modelKey(a.alias) === target)
  if (chained !== undefined || target === key) return { status: 400, field: 'model', message: `${JSON.stringify(entry.model)} is an alias: an alias names a model` }
  if (!isModel(target)) return { status: 400, field: 'model', message: `no model ${JSON.stringify(entry.model)}: an alias names a model of the inventory` }
  return undefined
}

/** A fallback list's problem (the model and each fallback a model or an alias, none twice, not the model itself), or undefined. */
export function fallbacksProblem (entry: ModelFallbacks, aliases: readonly ModelAlias[], isModel: IsModel): AliasProblem | undefined {
  const resolve = (name: string): string | undefined => {
    const key = modelKey(name)
    if (isModel(key)) return key
    const alias = aliases.find((a) => modelKey(a.alias) === key)
    return alias === undefined ? undefined : modelKey(alias.model)
  }
  const own = resolve(entry.model)
  if (own === undefined) return { status: 400, field: 'model', message: `no model or alias ${JSON.stringify(entry.model)}` }
  if (entry.fallbacks.length > FALLBACKS_MAX) return { status: 400, field: 'fallbacks', message: `names more than ${FALLBACKS_MAX} models` }
  const seen = new Set<string>([own])
  for (const [i, name] of entry.fallbacks.entries()) {
    const key = resolve(name)
    if (key === undefined) return { status: 400, field: `fallbacks[${i}]`, message: `no model or alias ${JSON.stringify(name)}` }
    if (key === own) return { status: 400, field: `fallbacks[${i}]`, message: `${JSON.stringify(name)} is ${JSON.stringify(entry.model)} itself` }
    if (seen.has(key)) return { status: 400, field: `fallbacks[${i}]`, message: `${JSON.stringify(name)} is named twice` }
    seen.add(key)
  }
  return undefined
}

/**
 * The catalogue with each alias as an entry of its own: the target's entry under the alias's name
 * (an alias whose target no server lists is not shown, as the target is not).
 */
export function withAliases<T extends { name: string, model?: string }> (entries: readonly T[], aliases: readonly ModelAlias[]): T[] {
  if (aliases.length === 0) return [...entries]
  const byKey = new Map(entries.map((e) => [modelKey(e.name), e]))
  const out = [...entries]
  for (const a of aliases) {
    const target = byKey.get(modelKey(a.model))
    if (target !== undefined && !byKey.has(modelKey(a.alias))) out.push({ ...target, name: a.alias, ...('model' in target ? { model: a.alias } : {}) })
  }
  return out
}
