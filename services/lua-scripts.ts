import { existsSync, readFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { packageRoot } from './package-root.js'

/**
 * The Lua scripts of the Redis lease store: `services/lua/<name>-<numberOfKeys>.lua`, each opening
 * with a header naming its KEYS, ARGV and reply; `--- @include "includes/<file>"` lines pull in the
 * shared functions (each file once). Read once, at start.
 */
export interface LuaScript {
  name: string
  numberOfKeys: number
  lua: string
}

function luaDir (): string {
  // From sources (tests) the folder sits beside this file; from dist/ it is the package's own.
  const here = join(dirname(fileURLToPath(import.meta.url)), 'lua')
  return existsSync(here) ? here : join(packageRoot, 'services', 'lua')
}

const INCLUDE = /^--- @include "([^"]+)"\s*$/gm

function expand (dir: string, source: string, seen: Set<string>): string {
  return source.replace(INCLUDE, (_, file: string) => {
    const path = join(dir, file.endsWith('.lua') ? file : `${file}.lua`)
    if (seen.has(path)) return ''
    seen.add(path)
    return expand(dir, readFileSync(path, 'utf8'), seen)
  })
}

export function loadLuaScripts (names: string[]): LuaScript[] {
  const dir = luaDir()
  return names.map((file) => {
    const match = /^(.+)-(\d+)$/.exec(file)
    if (match == null) throw new Error(`lua script name ${file} lacks its number of keys`)
    const lua = expand(dir, readFileSync(join(dir, `${file}.lua`), 'utf8'), new Set())
    return { name: match[1], numberOfKeys: Number(match[2]), lua }
  })
}
