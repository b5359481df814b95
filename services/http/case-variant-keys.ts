/**
 * Ollama decodes request bodies with Go's encoding/json, which matches an object key to a field
 * case-insensitively (Unicode simple case folding) when no key matches exactly, the last one
 * winning. A body with `"model":"small","Model":"big"` would be leased as `small` and run as
 * `big`; `KEEP_ALIVE` (or `\u212Aeep_alive`, with the Kelvin sign) would undo the forced keep_alive.
 * The gateway refuses such bodies (CONTRACT section 8).
 */

/** The keys the gateway reads or rewrites, by length (the cheap first check). */
const GUARDED: ReadonlyMap<number, string> = new Map([[5, 'model'], [6, 'stream'], [10, 'keep_alive']])

const KELVIN = 0x212a // folds to k
const LONG_S = 0x17f // folds to s

/**
 * A top-level key that folds to `model`, `stream` or `keep_alive` without being exactly it, if any.
 * The only characters outside ASCII whose simple-fold orbit meets an ASCII letter are the Kelvin
 * sign (k) and the long s (s), and both are one UTF-16 unit, so a case variant has the length of
 * the key it imitates: most keys are passed over by their length alone.
 */
export function caseVariantKey (body: object): string | undefined {
  for (const key in body) {
    const target = GUARDED.get(key.length)
    if (target === undefined || key === target || !foldsTo(key, target)) continue
    return key
  }
  return undefined
}

function foldsTo (key: string, target: string): boolean {
  for (let i = 0; i < key.length; i++) {
    let c = key.charCodeAt(i)
    if (c >= 0x41 && c <= 0x5a) c += 0x20
    else if (c === KELVIN) c = 0x6b
    else if (c === LONG_S) c = 0x73
    if (c !== target.charCodeAt(i)) return false
  }
  return true
}
