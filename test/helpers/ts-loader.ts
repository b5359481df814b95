/**
 * Node flags that run a `.ts` entry point in a child process the way tap runs the tests (the tsx
 * loader, no type check), whatever the child's working directory.
 */
export const TS_LOADER: string[] = [`--import=${import.meta.resolve('tsx')}`, '--enable-source-maps']
